"""`--engine hf`: the transformers `generate` baseline behind the Engine protocol.

Static padded batches (left padding). Each `step` takes up to `max_num_seqs`
waiting requests that share sampling settings (temperature/top_p/top_k/seed),
runs one `generate` to the largest max_tokens among them, then trims each
sequence at EOS, its own max_tokens, and its stop strings. Everything it runs
finishes in that step. Per-request problems come back as finish_reason 'error'.
"""
from __future__ import annotations

import logging
import time
from collections import deque

import torch

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class HFEngine:
    def __init__(self, model: str, device: str | None = None, dtype: str | torch.dtype | None = None,
                 max_num_seqs: int = 16, max_model_len: int | None = None, tokenizer=None, **_ignored):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from engine.model_source import resolve_model

        path = resolve_model(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None or dtype == "auto":
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        cfg = self.model.config
        self.max_model_len = int(max_model_len or getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.max_num_seqs = max(1, int(max_num_seqs))
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        self._waiting: deque = deque()
        self._errors: list[RequestOutput] = []
        self._aborted: set[str] = set()
        self._stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "spec_proposed": 0,
                       "spec_accepted": 0, "kv_usage": 0.0, "preemptions": 0, "steps": 0, "requests": 0}

    # -- protocol --------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    job_id: str | None = None) -> None:
        now = time.monotonic()
        try:
            if not prompt_token_ids:
                raise ValueError("prompt is empty (0 tokens)")
            if len(prompt_token_ids) >= self.max_model_len:
                raise ValueError(f"prompt is {len(prompt_token_ids)} tokens; the model's context is {self.max_model_len}")
            params.validate()
        except Exception as e:  # noqa: BLE001
            self._errors.append(RequestOutput(request_id, list(prompt_token_ids or []), [], "", True, "error",
                                              str(e), arrival_time=now, finish_time=now))
            return
        self._waiting.append((request_id, list(prompt_token_ids), params, now))

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)
        self._waiting = deque(w for w in self._waiting if w[0] != request_id)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._errors)

    def num_unfinished(self) -> int:
        return len(self._waiting) + len(self._errors)

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def step(self) -> list[RequestOutput]:
        out, self._errors = self._errors, []
        if not self._waiting:
            return out
        first = self._waiting[0][2]
        key = self._key(first)
        batch, rest = [], deque()
        while self._waiting:
            w = self._waiting.popleft()
            if len(batch) < self.max_num_seqs and self._key(w[2]) == key:
                batch.append(w)
            else:
                rest.append(w)
        self._waiting = rest
        try:
            out.extend(self._run(batch))
        except Exception as e:  # noqa: BLE001 - a batch failure fails its rows, not the engine
            log.exception("hf batch failed")
            now = time.monotonic()
            out.extend(RequestOutput(rid, ids, [], "", True, "error", f"engine error: {e}", arrival_time=t0,
                                     finish_time=now) for rid, ids, _p, t0 in batch)
        self._stats["steps"] += 1
        return out

    # -- internals -------------------------------------------------------------
    @staticmethod
    def _key(p: SamplingParams):
        return (p.greedy, None if p.greedy else (p.temperature, p.top_p, p.top_k, p.min_p, p.seed))

    def _run(self, batch) -> list[RequestOutput]:
        p0 = batch[0][2]
        lens = [len(ids) for _r, ids, _p, _t in batch]
        width = max(lens)
        room = self.max_model_len - width
        max_new = max(1, min(max(p.max_tokens for _r, _i, p, _t in batch), room))
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (_r, ids, _p, _t) in enumerate(batch):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attn[i, width - len(ids):] = 1
        kw = dict(max_new_tokens=max_new, pad_token_id=self.pad_id, do_sample=not p0.greedy,
                  eos_token_id=sorted(self.eos_ids) or None)
        if not p0.greedy:
            kw.update(temperature=p0.temperature, top_p=p0.top_p, top_k=p0.top_k or 0)
            if p0.min_p:
                kw["min_p"] = p0.min_p
            if p0.seed is not None:
                torch.manual_seed(p0.seed)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            gen = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attn.to(self.device), **kw)
        gen = gen[:, width:].tolist()
        now = time.monotonic()
        outs = []
        for (rid, ids, p, t0), toks in zip(batch, gen):
            if rid in self._aborted:
                self._aborted.discard(rid)
                continue
            limit = min(p.max_tokens, self.max_model_len - len(ids))
            reason = "length"
            cut = []
            for t in toks:
                if t in self.eos_ids and not p.ignore_eos:
                    reason = "stop"
                    break
                if t in p.stop_token_ids:
                    reason = "stop"
                    break
                cut.append(t)
                if len(cut) >= limit:
                    break
            if reason == "length" and len(cut) < limit and len(toks) <= len(cut):
                reason = "length"
            text = self.tokenizer.decode(cut, skip_special_tokens=True)
            if p.stop:
                hits = [(text.find(s), s) for s in p.stop if s in text]
                if hits:
                    pos = min(h[0] for h in hits)
                    text = text[:pos]
                    # keep the tokens that make up the kept text
                    kept = []
                    for t in cut:
                        if len(self.tokenizer.decode(kept + [t], skip_special_tokens=True)) > pos:
                            break
                        kept.append(t)
                    cut = kept
                    reason = "stop"
            self._stats["prompt_tokens"] += len(ids)
            self._stats["generated_tokens"] += len(cut)
            self._stats["requests"] += 1
            outs.append(RequestOutput(rid, ids, cut, text, True, reason, None, arrival_time=t0,
                                      first_token_time=None, finish_time=now))  # generate() hides TTFT
        return outs
