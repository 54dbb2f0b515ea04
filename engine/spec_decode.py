"""Speculative decoding inside the engine: before scheduling, a proposer drafts up
to k tokens for each decoding request (k chosen per step by the adaptive
controller); the scheduler grants them as ordinary tokens, so the target scores
all k+1 positions in the same forward; `verify` accepts them exactly.

KV written for rejected drafts needs no cleanup: `num_computed_tokens` stops at
the last accepted token, so those slots are overwritten by the next tokens.
"""
from __future__ import annotations

from collections import deque

import torch

from engine.request import Request
from engine.sampler import SamplingTensors, exponential_noise, processed_probs
from engine.spec import NgramProposer, SpecController, SuffixProposer, rejection_sample
from engine.spec.adaptive import batch_bucket
from engine.spec.rejection import SpecNoise


def make_proposer(engine):
    cfg = engine.config
    if cfg.speculative_method == "ngram":
        return NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
    if cfg.speculative_method == "suffix":
        return SuffixProposer()
    if cfg.speculative_method == "draft":
        from engine.draft_proposer import DraftModelProposer
        return DraftModelProposer(cfg.speculative_model, engine)
    raise ValueError(f"unknown speculative method {cfg.speculative_method!r}; use ngram, suffix or a draft model")


class SpecGovernor:
    """Speculate only where it measurably pays: per batch-size bucket, compare tokens per
    second of speculating-mode steps and plain steps, and re-check the loser now and then.
    Each re-check that confirms the loser doubles the wait before the next one, so a mode
    that keeps losing costs almost nothing in the long run.

    A mode's rate is tokens over seconds of its last `window` steps, without the slowest one,
    and each mode gets `warm` steps before the first comparison. Tokens over seconds (not a
    median of per-step rates) charges the occasional costly step (a wait for tokens in
    flight, an index build) to the mode that caused it; dropping the slowest step keeps one
    outlier (the first index build, a step behind a long prefill) from locking a mode out."""

    def __init__(self, explore_every: int = 32, explore_steps: int = 2, max_every: int = 256,
                 window: int = 16, warm: int = 3, tie_margin: float = 0.03) -> None:
        self.samples: dict[tuple[int, bool], deque[tuple[int, float]]] = {}
        self.explore_every, self.explore_steps, self.max_every = explore_every, explore_steps, max_every
        self.window, self.warm, self.tie_margin = window, warm, tie_margin
        self.steps: dict[int, int] = {}
        self.every: dict[int, int] = {}
        self.best: dict[int, bool] = {}

    bucket = staticmethod(batch_bucket)

    def rate(self, batch: int, speculating: bool) -> float | None:
        s = self.samples.get((self.bucket(batch), speculating))
        if not s:
            return None
        tokens = sum(t for t, _ in s)
        seconds = sum(sec for _, sec in s)
        if len(s) >= 3:
            t_max, sec_max = max(s, key=lambda x: x[1])
            tokens, seconds = tokens - t_max, seconds - sec_max
        return tokens / seconds

    def speculate(self, batch: int) -> bool:
        b = self.bucket(batch)
        n_spec = len(self.samples.get((b, True), ()))
        n_plain = len(self.samples.get((b, False), ()))
        if min(n_spec, n_plain) < self.warm:  # measure both first, speculation first
            return n_spec <= n_plain
        # Speculation keeps near-ties: a speculating-mode step where the controller drafts
        # nothing costs what a plain one does, and only in that mode can the controller gather
        # the evidence (scored guesses) that turns drafting on where text becomes copyable.
        # What the governor guards against is a mode that is clearly slower.
        best = self.rate(batch, True) * (1 + self.tie_margin) >= self.rate(batch, False)
        every = self.every.get(b, self.explore_every)
        if self.best.get(b) is not None and self.best[b] != best:
            every = self.explore_every  # the winner changed: watch closely again
        self.best[b] = best
        n = self.steps.get(b, 0) + 1
        if n >= every + self.explore_steps:  # a re-check just ended and confirmed the winner
            n, every = 0, min(2 * every, self.max_every)
        self.steps[b], self.every[b] = n, every
        if n == every:
            # A re-check starts: the loser is measured afresh (until it has `warm` steps again),
            # not judged on samples from long ago, when the workload may have been different.
            self.samples.pop((b, not best), None)
        return best != (n >= every)

    def observe(self, batch: int, speculated: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        key = (self.bucket(batch), speculated)
        self.samples.setdefault(key, deque(maxlen=self.window)).append((tokens, seconds))


class SpecDecoder:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.k = engine.config.num_speculative_tokens
        self.adaptive = engine.config.adaptive_speculation
        self.proposer = make_proposer(engine)
        # Host-side lookups (not a draft model): cheap enough to ask twice per step.
        self.cheap_proposer = engine.config.speculative_method in ("ngram", "suffix")
        self.controller = SpecController(max_k=self.k)
        self.governor = SpecGovernor() if self.adaptive else None
        if not engine.async_output:
            self.controller.sync_factor = 0.0  # steps never overlap here, so drafting loses nothing
        # request id -> (position, token) the proposer guessed from the history before it
        self._guesses: dict[str, tuple[int, int]] = {}
        self.probe_every, self.probe_max, self._probe_tick = 4, 64, 0
        if self.cheap_proposer:
            # Scored guesses keep every request's estimate current, so an estimate need not
            # fade toward the prior while the request is not drafting (the draft model has
            # no free guesses and keeps that fading).
            self.controller.idle_decay = 1.0

    def should_speculate(self, num_running: int) -> bool:
        return self.governor is None or self.governor.speculate(num_running)

    def observe(self, batch: int, spec_mode: bool, tokens: int, seconds: float, rows: int = 0,
                drafted: bool = False, overlapped: bool = False, decode_only: bool = True) -> None:
        if self.governor is not None:
            self.governor.observe(batch, spec_mode, tokens, seconds)
        if self.adaptive and self.engine.async_output:
            self.controller.observe_step(batch, rows or batch, drafted, overlapped, seconds, decode_only)

    def plan(self, running: list[Request]) -> list[tuple[Request, int]]:
        """(request, k) for each decoding request that should draft this step. Needs no
        token values, so it can run while the previous step's tokens are still on the GPU."""
        if self.adaptive and not self.controller.can_pay(len(running)):
            return []  # quick reject at large batches (fewer decoding rows are checked below)
        reqs = [r for r in running if r.num_computed_tokens == r.num_tokens - 1 and not r.spec_token_ids]
        if not reqs:
            return []
        # Room left: drafts never run past max_tokens or the model's context.
        caps = [max(0, min(self.k, r.params.max_tokens - len(r.output_token_ids) - 1,
                           self.engine.max_model_len - r.num_tokens - 1)) for r in reqs]
        if not self.adaptive:
            return [(r, k) for r, k in zip(reqs, caps) if k > 0]
        if not self.controller.can_pay(len(reqs)):
            return []  # too large a batch for drafts to pay: spend no host time on them
        self._score_guesses(reqs)
        ids = [r.request_id for r in reqs]
        ks = self.controller.choose_k(ids, caps)
        if not self.cheap_proposer:
            return [(r, k) for r, k in zip(reqs, ks) if k > 0]
        if not any(ks):
            # Nobody is worth drafting for on current evidence. Every few steps, guess anyway
            # (no drafts, no waiting): scored guesses are how a request that turned copyable
            # earns its drafts back, and the only evidence a new request gets.
            self._probe_tick += 1
            if self._probe_tick % self.probe_every == 0:
                self._lookahead(reqs[:self.probe_max])
            return []
        # The controller assumed every planned request drafts. Ask the proposer which really
        # would, from the history already on the host, and decide again over those alone: a
        # drafting step loses its overlap once for the whole batch, so the requests that will
        # draft must win that back by themselves (open chat: a few weak matches per step).
        planned = [i for i, k in enumerate(ks) if k > 0]
        found = self._lookahead([reqs[i] for i in planned])
        caps = [0] * len(reqs)
        for i, f in zip(planned, found):
            caps[i] = ks[i] if f else 0
        if not any(caps):
            return []  # nothing to copy even from the known history: keep the step overlapped
        ks = self.controller.choose_k(ids, caps, forget_idle=False)
        return [(r, k) for r, k in zip(reqs, ks) if k > 0]

    def _lookahead(self, reqs: list[Request]) -> list[bool]:
        """Would the proposer find a draft for each request from the tokens already on the
        host? For a request with a token in flight that is the history before it: the newest
        token rarely changes whether the text is copying, and waiting for it would cost the
        step its overlap. Each draft's first token is a guess at the next token, scored for
        free once that token is known (`_score_guesses`): acceptance evidence for requests
        that do not draft."""
        hists = []
        for r in reqs:
            h = r.all_token_ids
            hists.append(h[:len(h) - r.num_pending] if r.num_pending else h)
        found = self.proposer.propose([r.request_id for r in reqs], hists, [1] * len(reqs),
                                      [getattr(r, "job_id", None) for r in reqs])
        for r, h, f in zip(reqs, hists, found):
            if f:
                self._guesses[r.request_id] = (len(h), f[0])
        return [bool(f) for f in found]

    def _score_guesses(self, reqs: list[Request]) -> None:
        for r in reqs:
            g = self._guesses.get(r.request_id)
            if g is None:
                continue
            pos, tok = g
            known = r.num_tokens - r.num_pending
            if pos >= known:
                continue  # not produced yet (still in flight)
            del self._guesses[r.request_id]
            p = r.num_prompt_tokens
            actual = r.prompt_token_ids[pos] if pos < p else r.output_token_ids[pos - p]
            self.controller.record_guess(r.request_id, actual == tok)

    def propose(self, plan: list[tuple[Request, int]]) -> bool:
        """Set spec_token_ids for the planned requests still running; True if any got drafts."""
        plan = [(r, k) for r, k in plan if not r.is_finished]
        if not plan:
            return False
        drafts = self.proposer.propose([r.request_id for r, _ in plan], [r.all_token_ids for r, _ in plan],
                                       [k for _, k in plan], [getattr(r, "job_id", None) for r, _ in plan])
        any_draft = False
        for (r, k), d in zip(plan, drafts):
            r.spec_token_ids = list(d[:k])
            any_draft |= bool(r.spec_token_ids)
        return any_draft

    def verify(self, reqs: list[Request], rows_per_req: list[int], logits: torch.Tensor) -> list[list[int]]:
        """Tokens to emit per request: accepted drafts, then one corrected or bonus token."""
        if all(r.params.greedy for r in reqs):  # the rest needs probabilities and noise
            return self._verify_greedy(reqs, rows_per_req, logits)
        N, K1, V = len(reqs), max(rows_per_req), logits.shape[1]
        dev = logits.device
        counts = torch.tensor(rows_per_req, device=dev)
        st = SamplingTensors.from_requests(reqs, V, dev)
        starts = torch.cumsum(counts, 0) - counts
        # Scatter the flat scored rows into [N, K+1] (padding rows repeat row 0; never read).
        col = torch.arange(K1, device=dev)
        idx = (starts[:, None] + col[None, :]).clamp(max=logits.shape[0] - 1)
        valid = col[None, :] < counts[:, None]
        idx = torch.where(valid, idx, starts[:, None])
        padded_logits = logits[idx]  # [N, K+1, V]
        target_argmax = padded_logits.argmax(-1)  # greedy rows of a mixed batch follow it
        probs = processed_probs(padded_logits.reshape(N * K1, V),
                                st.repeat(torch.full((N,), K1, device=dev))).reshape(N, K1, V)
        flat = exponential_noise(reqs, V, dev, self.engine.default_generator, [K1] * N)
        noise = SpecNoise(exp=flat.reshape(N, K1, V), uniform=torch.rand(N, K1 - 1, device=dev))
        num_draft = counts - 1
        drafts = torch.zeros(N, max(1, K1 - 1), dtype=torch.long)
        for i, r in enumerate(reqs):
            d = r.spec_token_ids[:rows_per_req[i] - 1]
            drafts[i, :len(d)] = torch.tensor(d, dtype=torch.long)
        greedy = st.temperature <= 0
        if K1 == 1:  # nobody drafted: rejection_sample still handles it, with K = 0
            drafts = drafts[:, :0]
        out = rejection_sample(probs, drafts.to(dev), num_draft, greedy=greedy, target_argmax=target_argmax,
                               noise=noise)
        return self._record(reqs, rows_per_req, out.tokens.tolist(), out.num_accepted.tolist())

    def _verify_greedy(self, reqs: list[Request], rows_per_req: list[int], logits: torch.Tensor) -> list[list[int]]:
        """Greedy rows: a draft is accepted while it equals the target's argmax, and the argmax
        after the last accepted draft is the bonus or corrected token. One device-to-host copy."""
        top = logits.argmax(-1).tolist()
        tokens, num_acc, row = [], [], 0
        for r, n in zip(reqs, rows_per_req):
            t = top[row:row + n]
            row += n
            a = 0
            for d in r.spec_token_ids[:n - 1]:
                if d != t[a]:
                    break
                a += 1
            tokens.append(t)
            num_acc.append(a)
        return self._record(reqs, rows_per_req, tokens, num_acc)

    def _record(self, reqs, rows_per_req, tokens, num_acc) -> list[list[int]]:
        result = []
        for i, r in enumerate(reqs):
            proposed = rows_per_req[i] - 1
            if proposed:
                self.controller.record(r.request_id, proposed, num_acc[i], getattr(r, "job_id", None))
                r.spec_proposed += proposed
                r.spec_accepted += num_acc[i]
                self.engine.counters["spec_proposed"] += proposed
                self.engine.counters["spec_accepted"] += num_acc[i]
                self.engine.counters["spec_verifications"] += 1
            result.append(tokens[i][:num_acc[i] + 1])
        return result

    def on_finished(self, req: Request) -> None:
        self.proposer.on_finished(req.request_id, req.output_token_ids, getattr(req, "job_id", None))
        self.controller.forget(req.request_id)
        self._guesses.pop(req.request_id, None)
