"""Draft-model proposer: a smaller model with the target's tokenizer, run by our own
engine with its own paged KV cache. It drafts greedily, so q is a point mass on
each draft token and verification keeps the target distribution exactly.

Each request's draft state mirrors the target's accepted history: before drafting,
tokens the target rejected are dropped and `num_computed_tokens` is cut back to the
common prefix, so the draft's stale KV slots are simply overwritten.
"""
from __future__ import annotations

from engine.sampling_params import SamplingParams


class DraftModelProposer:
    is_deterministic = True

    def __init__(self, model: str, target) -> None:
        from engine.llm_engine import LLMEngine
        cfg = target.config
        self.engine = LLMEngine(
            model, tokenizer=target.tokenizer, device=str(target.device), dtype=cfg.dtype, block_size=cfg.block_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization, kv_cache_memory=cfg.kv_cache_memory,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=target.max_model_len, enable_prefix_caching=False,
            # Like the target: on the GPU the host prepares draft step j+1 while step j runs,
            # each step's token reaching the next on the device; `_flush` collects them.
            async_scheduling=target.async_output,
            num_gpu_blocks_override=cfg.num_gpu_blocks_override,  # a fixed target pool fixes the draft's too
            seed=cfg.seed + 1, load_format=cfg.load_format)  # a random target gets a different random draft
        if self.engine.vocab_size != target.vocab_size:
            raise ValueError(f"draft model vocabulary ({self.engine.vocab_size}) differs from the target's "
                             f"({target.vocab_size}); a draft model must share the target's tokenizer")
        self._params = SamplingParams(max_tokens=target.max_model_len, temperature=0.0, ignore_eos=True,
                                      detokenize=False)

    def _sync(self, rid: str, hist: list[int]) -> None:
        req = self.engine.requests.get(rid)
        if req is None:
            self.engine.add_request(rid, list(hist), self._params)
            return
        n_prompt = req.num_prompt_tokens
        if len(hist) < n_prompt or hist[:n_prompt] != req.prompt_token_ids:
            self.engine.abort(rid)  # history rewritten: start over
            self.engine.add_request(rid, list(hist), self._params)
            return
        mine = req.output_token_ids
        theirs = hist[n_prompt:]
        common = 0
        for a, b in zip(mine, theirs):
            if a != b:
                break
            common += 1
        req.output_token_ids = list(theirs)
        req.num_computed_tokens = min(req.num_computed_tokens, n_prompt + common, len(hist) - 1)

    def propose(self, request_ids: list[str], token_ids: list[list[int]], k: list[int],
                job_ids=None) -> list[list[int]]:
        for rid, hist in zip(request_ids, token_ids):
            self._sync(rid, hist)
        want = dict(zip(request_ids, zip(map(len, token_ids), k)))
        # Step the draft engine until every asked request has its k drafts (prefill first).
        for _ in range(max(k, default=0) + 64):
            reqs = self.engine.requests
            # (num_tokens counts tokens still on the device: enough steps are launched)
            if all(rid not in reqs or reqs[rid].num_tokens - n >= kk for rid, (n, kk) in want.items()):
                break
            self.engine.step()
        self._flush()
        out = []
        for rid, (n, kk) in want.items():
            req = self.engine.requests.get(rid)
            out.append(req.all_token_ids[n:n + kk] if req is not None else [])
        return out

    def _flush(self) -> None:
        """Bring the draft step still in flight to the host, so every draft token is known and
        nothing runs while the next call rewrites the draft requests' histories."""
        eng = self.engine
        if eng._inflight is not None:
            fl, eng._inflight = eng._inflight, None
            eng._finish(fl)  # draft requests never finish on their own (ignore_eos, no limit)

    def on_finished(self, request_id: str, token_ids: list[int], job_id: str | None = None) -> None:
        self.engine.abort(request_id)
