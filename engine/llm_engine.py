"""The paged engine behind the worker: add_request / step / abort.

A step schedules under the token budget, runs one forward over the flat batch,
samples (or verifies drafts), appends tokens, checks stop conditions and hands
back the requests that finished.
"""
from __future__ import annotations

import gc
import logging
import time

import torch

from engine.block_manager import BlockManager
from engine.decode_burst import advance_decode_inputs, burst_length
from engine.config import EngineConfig
from engine.model_runner import ModelRunner, pick_device
from engine.model_source import resolve_model
from engine.models.loader import arch_from_config, read_config
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import SamplingTensors, exponential_noise, sample
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.stop_checker import StopChecker

log = logging.getLogger(__name__)


PENDING = -1  # placeholder for a token still being sampled on the device


class _Inflight:
    """A launched step whose sampled tokens have not reached the host yet."""

    def __init__(self, batch, inp, sample_reqs, t0, t1, t2) -> None:
        self.batch, self.inp, self.sample_reqs = batch, inp, sample_reqs
        self.t0, self.t1, self.t2 = t0, t1, t2
        self.speculated = False  # verified drafts: `packed` holds tokens and accepted counts
        self.burst = 1  # decode steps run back to back (`packed` holds every step's tokens)
        self.t_start = t0  # when the step() call that launched it began (before any drafting)
        # Host time its call spent deciding and drafting before the step before it finished:
        # that time lies in the earlier step's period, and is moved from it to this one's.
        self.lead = 0.0
        self.build_s = 0.0  # of its period, the proposer's one-time index builds (not learned from)
        self.overlapped = False  # launched while the previous step was still in flight
        self.spec_mode = False  # the governor had speculation on when this step was planned
        self.num_running = 0  # running requests when it was planned (the governor's batch size)
        self.spec_job = None  # the job the governor decided for
        # On the device, per sampling request: the newest token (the next step gathers its
        # input from it) and, after verification, the drafts accepted (the next step's shift).
        self.tokens: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None  # [N, K+2]: emitted tokens (padded), then accepted
        self.logprobs: torch.Tensor | None = None
        # Per sampling request: (drafts scored, tokens they assumed, history length they follow).
        self.drafts: list[tuple[list[int], list[int], int]] = []
        self.logprobs_host: list | None = None
        self._host: torch.Tensor | None = None
        self._host_lp: torch.Tensor | None = None
        self._event = None

    def copy_to_host(self) -> None:
        src = self.packed if self.packed is not None else self.tokens
        if src.is_cuda:
            # Copy right behind the sampling kernels, so waiting for it does not wait for the next step.
            self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self._host.copy_(src, non_blocking=True)
            if self.logprobs is not None:
                self._host_lp = torch.empty(self.logprobs.shape, dtype=self.logprobs.dtype, pin_memory=True)
                self._host_lp.copy_(self.logprobs, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._host_lp = src, self.logprobs

    def wait(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        if self._host_lp is not None:
            self.logprobs_host = self._host_lp.tolist()
        return self._host.tolist()


class LLMEngine:
    def __new__(cls, *args, **kwargs):
        fg = kwargs.get("freeze_gc", "auto")
        if fg is True or (fg == "auto" and pick_device(kwargs.get("device", "auto")).type == "cuda"):
            # What the process has loaded so far (torch, transformers: some 300k objects) lives
            # as long as it does. Out of the collector's reach, a full collection scans only
            # what came later: it stalled 130-340 ms otherwise (measured inside suffix
            # proposals on the H100's host). Frozen before the engine exists, so none of the
            # engine's objects are: a deleted engine's cycles are still collected.
            gc.collect()
            gc.freeze()
        return super().__new__(cls)

    def __init__(self, model: str, tokenizer=None, **kwargs) -> None:
        path = resolve_model(model)
        self.config = EngineConfig(model=path, **kwargs)
        cfg = read_config(path)
        arch = arch_from_config(cfg)
        limit = arch.max_position_embeddings
        if arch.sliding_window:
            limit = min(limit, arch.sliding_window)  # beyond it, full attention would be wrong
        self.max_model_len = min(self.config.max_model_len or limit, limit)
        if tokenizer is None:
            tokenizer = _load_tokenizer(path)
        self.tokenizer = tokenizer
        self.runner = ModelRunner(self.config, path, self.max_model_len)
        self.device = self.runner.device
        self.vocab_size = self.runner.arch.vocab_size
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching, model_key=path)
        self.scheduler = Scheduler(self.config, self.block_manager, self.max_model_len)
        if self.device.type == "cuda" and not self.config.enforce_eager:
            self.scheduler.min_admission_slots = max(1, self.config.max_num_seqs // 8)
            self.scheduler.graph_rows = self.runner.max_prefill_rows_as_decode
            self.scheduler.graph_reads = self.runner.max_decode_row_reads
        self.stop_checker = StopChecker(tokenizer, _eos_ids(cfg, tokenizer, path), self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.default_generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self._pending: list[RequestOutput] = []  # rejected at add_request
        self._inflight: _Inflight | None = None  # launched, not yet finished on the host
        self.counters = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                         "spec_proposed": 0, "spec_accepted": 0, "spec_verifications": 0, "steps": 0,
                         "spec_mode_steps": 0, "spec_wait_steps": 0, "burst_steps": 0,
                         "finished": 0}
        self.timings = {"steps": 0, "schedule_s": 0.0, "prepare_s": 0.0, "forward_sample_s": 0.0, "update_s": 0.0}
        # (seconds, decode-only, batch size, KV tokens read) per step, when a benchmark asks.
        self.step_log: list[tuple[float, bool, int, int]] | None = None
        self._last_finish = 0.0
        self._lead = 0.0  # drafting time before a wait that finished the step in flight
        # Overlap host work with the GPU (steps that speculate run without it).
        a = self.config.async_scheduling
        self.async_output = a is True or (a == "auto" and self.device.type == "cuda")
        self.spec = None
        if self.config.speculative_method:
            from engine.spec_decode import SpecDecoder
            self.spec = SpecDecoder(self)

    # ---- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    job_id: str | None = None) -> None:
        params = params or SamplingParams()
        now = time.monotonic()
        try:
            params.validate()
            if not prompt_token_ids:
                raise ValueError("prompt is empty")
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already running")
            if self.tokenizer is None and (params.detokenize or params.stop):
                raise ValueError("this model folder has no tokenizer: use detokenize=False and no stop strings")
            bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt has token id {bad[0]} outside the vocabulary (size {self.vocab_size})")
        except (ValueError, TypeError) as e:  # a bad request fails alone; the engine goes on
            self._pending.append(RequestOutput(request_id, list(prompt_token_ids), [], "", True, "error",
                                               error=str(e), arrival_time=now, finish_time=now))
            return
        req = Request(request_id, list(prompt_token_ids), params, arrival_time=now,
                      cache_salt=self.config.cache_salt, job_id=job_id)
        self.requests[request_id] = req
        self.scheduler.add(req)
        if self.spec is not None:
            self.spec.on_added(req)

    def abort(self, request_id: str) -> None:
        req = self.scheduler.abort(request_id)
        if req is not None:
            self._forget(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._inflight is not None

    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished()

    # ---- the step --------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduling step. With async output (GPU) the step launched here runs on the
        GPU while the host finishes the previous one, so the outputs returned are those of
        the previous step. A step that drafts first waits for the step in flight, unless
        `speculative_draft_ahead` lets n-gram and suffix drafts continue its token as the
        proposer guesses it (verification and the shift it causes stay on the device either
        way). A draft model always needs every token on the host."""
        outputs, self._pending = self._pending, []
        t_start = time.perf_counter()
        overlap = self.async_output
        num_running = len(self.scheduler.running)
        spec_mode = self.spec is not None and self.spec.should_speculate(num_running)
        if self.spec is not None:
            self.spec.clear_drafts()
        if spec_mode:
            self.counters["spec_mode_steps"] += 1
            if self.spec.drafts_ahead:
                running = self.scheduler.running
                if self.config.speculative_draft_ahead:
                    fl = self._inflight
                    if fl is not None and fl.speculated and self.spec.would_draft(running):
                        # Drafts after a verification still in flight would have to assume all
                        # of its drafts accepted, which holds too rarely; wait for it instead.
                        # After a plain step the drafts only assume its one token (a guess).
                        outputs.extend(self._wait_inflight(t_start))
                    self.spec.draft_ahead(running)
                else:
                    # Draft from the tokens on the host first: only if someone really has
                    # something to copy does the host wait for the step in flight, then draft
                    # again from whole histories (exact drafts, one lost overlap).
                    if self._inflight is None:
                        self.spec.draft_ahead(running)
                    elif self.spec.draft_ahead(running, will_wait=True):
                        outputs.extend(self._wait_inflight(t_start))  # (deciding gave out no drafts)
                        self.spec.draft_ahead(running)
            else:
                plan = self.spec.plan(self.scheduler.running)
                if plan:
                    outputs.extend(self._wait_inflight(t_start))
                    drafted = self.spec.propose(plan)
                    overlap = self.async_output and not drafted
        t0 = time.perf_counter()
        lead, self._lead = self._lead, 0.0  # (set where a wait above finished the step in flight)
        batch = self.scheduler.schedule()
        for req in batch.errors:
            self._forget(req)
            outputs.append(self._output(req, "error"))
        burst = 1
        if self.spec is None and batch.requests:
            burst = burst_length(batch, self.config.num_scheduler_steps, self.max_model_len, self.block_manager)
        launched = self._launch(batch, t0, burst) if batch.requests else None
        if overlap and self._inflight is not None:
            lead = t0 - t_start  # the step in flight finishes below, after this call's drafting
        if launched is not None:
            launched.spec_mode, launched.num_running = spec_mode, num_running
            launched.spec_job = self.spec.decided_job if self.spec is not None else None
            if self.spec is not None:
                launched.build_s = self.spec.take_build_seconds()
            launched.t_start, launched.lead = t_start, lead
            launched.overlapped = overlap and self._inflight is not None
        if overlap:
            done, self._inflight = self._inflight, launched
        else:  # a drafting step already finished the one in flight; without async output there is none
            done = launched
        if done is not None:
            # With overlap, the step finished here ends after this call launched the next one:
            # a prefill launched eagerly (~15 ms of kernel launches on SmolLM2) then lands in
            # the finished decode step's period, which says nothing about decode steps then.
            tainted = launched is not None and launched is not done and launched.inp.has_prefill
            # (with nothing launched after it, as at a run's end, its period holds no launch)
            outputs.extend(self._finish(done, tainted, lead if done is not launched else 0.0,
                                        early=overlap and launched is None))
        return outputs

    def _wait_inflight(self, t_start: float) -> list[RequestOutput]:
        """Finish the step in flight now (before drafting), so every token is on the host.
        `t_start`: when this step() call began (its drafting so far belongs to the next step)."""
        fl, self._inflight = self._inflight, None
        if fl is None:
            return []
        self.counters["spec_wait_steps"] += 1
        self._lead = time.perf_counter() - t_start
        return self._finish(fl, next_lead=self._lead, early=True)

    def _launch(self, batch, t0: float, burst: int = 1) -> "_Inflight":
        t1 = time.perf_counter()
        inp = self.runner.prepare(batch, self._inflight, self.block_manager.table)
        inp.meta.max_context_len += burst - 1
        t2 = time.perf_counter()
        logits = self.runner.forward(inp)
        sample_reqs = [batch.requests[i] for i in inp.sample_rows]
        fl = _Inflight(batch, inp, sample_reqs, t0, t1, t2)
        fl.burst = burst
        want_lp = any(r.params.logprobs for r in sample_reqs)
        if inp.draft_ids is not None:
            fl.speculated = True
            fl.tokens, fl.offsets, fl.packed, fl.logprobs = self.spec.verify(sample_reqs, inp, logits, want_lp)
            fl.drafts = [(r.spec_token_ids[:n - 1], r.spec_assumed, r.spec_base)
                         for r, n in zip(sample_reqs, inp.rows_per_req)]
        else:
            st = SamplingTensors.from_requests(sample_reqs, self.vocab_size, self.device)
            fl.tokens, fl.logprobs = self._sample(logits, st, sample_reqs, inp.sample_offsets, want_lp)
            if burst > 1:
                fl.tokens, fl.packed = self._burst_rest(inp, st, sample_reqs, fl.tokens, burst)
        fl.copy_to_host()
        # The scheduled tokens' KV is written by this step. Drafts count as computed only once
        # the host knows how many were accepted (`_finish`); until then the next step's
        # positions are shifted on the device. Each sampling request gets one placeholder for
        # what this step emits (1 + accepted drafts tokens), filled in by `_finish`.
        # A burst computes `burst` tokens per request and leaves as many placeholders.
        for req, n in zip(batch.requests, batch.num_tokens):
            req.num_computed_tokens += n + burst - 1
        for j, req in enumerate(sample_reqs):
            k = inp.rows_per_req[j] - 1
            req.num_computed_tokens -= k
            req.num_unverified += k
            req.inflight_drafts = fl.drafts[j][0] if k else []
            if burst == 1:
                req.output_token_ids.append(PENDING)
            else:
                req.output_token_ids.extend([PENDING] * burst)
            req.pending_row = j
            req.num_pending += burst
        for req in batch.requests:
            req.spec_token_ids = []
            self.block_manager.cache_full_blocks(req)
        return fl

    def _burst_rest(self, inp, st: SamplingTensors, reqs: list, tokens: torch.Tensor, burst: int):
        """A burst's steps after the first, each fed by the one before on the device. Returns
        the last step's tokens (the next step's inputs) and every step's, [requests, burst]."""
        steps = [tokens]
        for j in range(1, burst):
            advance_decode_inputs(inp, tokens, self.runner.block_size)
            logits = self.runner.forward(inp)
            # (a seeded request's noise follows its output position: j past the host's count)
            offsets = None if st.all_greedy else torch.full((len(reqs),), j, dtype=torch.int64, device=self.device)
            tokens, _ = self._sample(logits, st, reqs, offsets)
            steps.append(tokens)
        self.counters["burst_steps"] += burst - 1
        return tokens, torch.stack(steps, dim=1)

    def _sample(self, logits: torch.Tensor, st: SamplingTensors, reqs: list, offsets: torch.Tensor | None,
                want_lp: bool = False):
        """Tokens (and logprobs when asked) for one scored row per request; `offsets`: output
        positions beyond the host's count, which seeded noise is keyed by."""
        noise = None if st.all_greedy else exponential_noise(reqs, logits.shape[1], self.device,
                                                             self.default_generator, offsets=offsets)
        return sample(logits, st, noise, want_lp)

    def _finish(self, fl: "_Inflight", tainted: bool = False, next_lead: float = 0.0,
                early: bool = False) -> list[RequestOutput]:
        """The step's tokens reached the host: append, stop, free. `tainted`: its period holds
        another step's launch, so the speculation governor and controller do not learn from it.
        `next_lead`: host time the next step's call spent deciding and drafting before this
        finish (it belongs to that step, not to this one's period). `early`: finished before a
        next step was launched (by that call's wait), so its period holds no launch."""
        host = fl.wait()
        t3 = time.perf_counter()
        now = time.monotonic()
        outputs = []
        emitted = 0
        for j, req in enumerate(fl.sample_reqs):
            if req.is_finished:
                continue
            idx = len(req.output_token_ids) - req.num_pending  # the oldest placeholder is this step's
            req.num_pending -= fl.burst
            lp = fl.logprobs_host[j] if fl.logprobs_host is not None else None
            if fl.speculated:
                row = host[j]
                a = row[-1]
                toks = row[:a + 1]
                lp = lp[:a + 1] if lp is not None else None
                k = fl.inp.rows_per_req[j] - 1
                if k:
                    if req.status == RequestStatus.RUNNING:  # (a preempted request recomputes anyway)
                        req.num_computed_tokens += a  # accepted drafts keep their KV
                        req.num_unverified -= k
                    if req.inflight_drafts is fl.drafts[j][0]:  # (not a later step's, launched since)
                        req.inflight_drafts = []
                    self.spec.record(req, k, a, *fl.drafts[j][1:])
            elif fl.burst > 1:
                toks = host[j]
            else:
                toks = [host[j]]
                lp = [lp] if lp is not None else None
            req.output_token_ids[idx:idx + fl.burst] = toks
            emitted += len(toks)
            if lp is not None:
                req.output_logprobs.extend(lp)
            if req.first_token_time is None:
                req.first_token_time = now
                self.counters["prompt_tokens"] += req.num_prompt_tokens
                self.counters["cached_tokens"] += req.num_cached_tokens
            reason = None
            for k in range(len(toks)):
                self.counters["generated_tokens"] += 1
                reason = self.stop_checker.check(req, idx + k + 1)
                if reason:
                    del req.output_token_ids[idx + k + 1:]  # drop later placeholders and drafts
                    if lp is not None:
                        del req.output_logprobs[idx + k + 1:]
                    break
            if reason:
                self.scheduler.finish(req, reason)
                self._forget(req)
                outputs.append(self._output(req, reason))
            else:
                self.block_manager.cache_full_blocks(req)
        period = self._record_step(fl.inp, fl.t_start, fl.t0, fl.t1, fl.t2, t3, time.perf_counter(), fl.burst,
                                   fl.lead - next_lead)
        if self.spec is not None:
            # Credit the step to the mode the governor chose, not to whether drafts appeared:
            # a speculating-mode step whose proposer found nothing still paid for its planning,
            # and counting it as plain would make plain decoding look slow.
            self.spec.observe(len(fl.sample_reqs), fl.spec_mode, emitted, period - fl.build_s,
                              rows=sum(fl.inp.rows_per_req), drafted=fl.speculated, overlapped=fl.overlapped,
                              decode_only=fl.inp.meta.is_decode and not fl.inp.has_prefill, tainted=tainted,
                              running=fl.num_running, job=fl.spec_job, early=early)
        return outputs

    def _record_step(self, inp, t_start, t0, t1, t2, t3, t4, burst: int = 1, moved: float = 0.0) -> float:
        tm = self.timings
        tm["steps"] += 1
        self.counters["steps"] += 1
        tm["schedule_s"] += t1 - t0
        tm["prepare_s"] += t2 - t1
        tm["forward_sample_s"] += t3 - t2
        tm["update_s"] += t4 - t3
        # The period between finished steps: with overlap, a step's own span covers two calls.
        # It starts when the step() call began (a drafting step's proposer time counts), or
        # when the previous step finished, whichever is later. `moved`: drafting host time that
        # lies in one step's period but was spent for the next (with overlap, a step finishes
        # inside the next step's call, after that call decided and drafted): charged where it
        # was spent. Unmoved, the plain step before a stretch of speculating ones carried the
        # first one's drafting, and the last speculating step went without its successor's:
        # the governor learned plain decoding as slow (H200, open chat at batch 32: 2.2-3.0 ms
        # for plain steps of 1.1 ms) and kept speculation on at 0.78x.
        period = t4 - max(t_start, self._last_finish) + moved
        if self.step_log is not None:
            m = inp.meta
            # (a burst logs each of its forwards, with an equal share of its period)
            entry = (period / burst, m.is_decode, int(m.block_tables.shape[0]), inp.context_tokens)
            self.step_log.extend([entry] * burst)
        self._last_finish = t4
        return period

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        if self.spec is not None:
            self.spec.on_finished(req)

    def _output(self, req: Request, reason: str) -> RequestOutput:
        self.counters["finished"] += 1
        text = "" if reason == "error" else self.stop_checker.final_text(req)
        return RequestOutput(
            request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids), text=text, finished=True, finish_reason=reason,
            error=req.error, logprobs=list(req.output_logprobs) if req.params.logprobs else None,
            num_cached_tokens=req.num_cached_tokens, first_token_time=req.first_token_time,
            arrival_time=req.arrival_time, finish_time=time.monotonic(),
            metrics={"num_preemptions": req.num_preemptions, "spec_proposed": req.spec_proposed,
                     "spec_accepted": req.spec_accepted})

    # ---- visibility --------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        s = dict(self.counters)
        ps = self.block_manager.stats
        s.update(prefix_queries=ps.queries, prefix_hits=ps.hits, prefix_query_tokens=ps.query_tokens,
                 prefix_hit_tokens=ps.hit_tokens, kv_usage=self.block_manager.usage,
                 num_kv_blocks=self.block_manager.num_blocks,
                 preemptions=self.scheduler.num_preemptions,
                 model_load_seconds=self.runner.model_load_seconds, cascade_steps=self.runner.cascade_steps)
        s["prefix_cache_hit_rate"] = s["cached_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0
        s["spec_acceptance_rate"] = s["spec_accepted"] / s["spec_proposed"] if s["spec_proposed"] else 0.0
        # Drafts accepted per verification (a verified request emits this plus one token).
        s["spec_mean_accepted_length"] = (s["spec_accepted"] / s["spec_verifications"]
                                          if s["spec_verifications"] else 0.0)
        if self.device.type == "cuda":
            s["gpu_memory_bytes"] = torch.cuda.memory_allocated(self.device)
        return s


def _load_tokenizer(path: str):
    """The folder's tokenizer; None for weight-only folders (random-weight benchmarks)."""
    import os
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json",
                                                                  "tokenizer.model")):
        if os.path.isdir(path):
            return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _eos_ids(cfg: dict, tokenizer, path: str) -> set[int]:
    ids: set[int] = set()
    for src in (cfg.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(src)
    try:
        import json
        import os
        with open(os.path.join(path, "generation_config.json")) as f:
            g = json.load(f).get("eos_token_id")
        ids.update([g] if isinstance(g, int) else (g or []))
    except (OSError, ValueError):
        pass
    return ids
