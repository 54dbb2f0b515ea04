"""Speculative decoding inside the engine: before scheduling, a proposer drafts up
to k tokens for each decoding request (k chosen per step by the adaptive
controller); the scheduler grants them as ordinary tokens, so the target scores
all k+1 positions in the same forward; `verify` accepts them exactly, on the device.

With async output a step is planned while the previous one still runs. By default a
step that drafts first waits for it (only when the histories on the host match
something), so drafts follow known tokens. With `speculative_draft_ahead` the n-gram and
suffix proposers draft past the step in flight instead: the drafts continue the tokens
that step is expected to produce (its own drafts, all accepted, then the proposer's
guess at the next token). Where the expectation was wrong the drafts are simply
rejected: verification compares them with what the target computes after the real
tokens, so the output is exact either way. Either way, how many drafts a step accepted
stays on the device until the host needs it (the next step's positions shift there).

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
from kernels import ops


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


_GONE = "\0finished job"  # the governor's job once that job has left the engine


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
                 window: int = 16, warm: int = 3, tie_margin: float = 0.01) -> None:
        self.samples: dict[tuple[int, bool], deque[tuple[int, float]]] = {}
        self.explore_every, self.explore_steps, self.max_every = explore_every, explore_steps, max_every
        self.window, self.warm, self.tie_margin = window, warm, tie_margin
        self.steps: dict[int, int] = {}
        self.every: dict[int, int] = {}
        self.best: dict[int, bool] = {}
        # What was learned is learned for one job: its text decides whether drafts pay. The
        # state above belongs to `job`; other live jobs' states wait in `_saved`.
        self.job: str | None = None
        self._saved: dict[str | None, tuple] = {}

    bucket = staticmethod(batch_bucket)

    def use_job(self, job: str | None) -> None:
        """Decide and learn for this job from now on. A job seen for the first time starts
        unmeasured: a worker's engine runs job after job, and a verdict learned on open chat
        (re-checked only every few hundred steps by then) would otherwise hold speculation off
        through the extraction job after it."""
        if job == self.job:
            return
        if self.job is not _GONE and self.samples:
            self._saved[self.job] = (self.samples, self.steps, self.every, self.best)
        self.job = job
        self.samples, self.steps, self.every, self.best = self._saved.pop(job, None) or ({}, {}, {}, {})

    def forget_job(self, job: str | None) -> None:
        """The job has no request left in the engine."""
        self._saved.pop(job, None)
        if job == self.job:
            self.job = _GONE  # (its state is not saved when the next job comes)

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

    def observe(self, batch: int, speculated: bool, tokens: int, seconds: float, job: str | None = None) -> None:
        """A finished step, decided for `job` (dropped if the governor has moved on to another)."""
        if seconds <= 0 or tokens <= 0 or job != self.job:
            return
        key = (self.bucket(batch), speculated)
        self.samples.setdefault(key, deque(maxlen=self.window)).append((tokens, seconds))


class SpecDecoder:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.k = engine.config.num_speculative_tokens
        self.adaptive = engine.config.adaptive_speculation
        self.proposer = make_proposer(engine)
        # Host-side lookups (not a draft model): cheap enough to run every step (to decide
        # whether to wait), and able to draft ahead of the tokens in flight.
        self.drafts_ahead = engine.config.speculative_method in ("ngram", "suffix")
        self.controller = SpecController(max_k=self.k)
        self.governor = SpecGovernor() if self.adaptive else None
        if not engine.async_output:
            self.controller.sync_factor = 0.0  # steps never overlap here, so drafting loses nothing
        elif self.drafts_ahead and engine.config.speculative_draft_ahead:
            # Drafting after a plain step keeps the overlap; drafting again right after a
            # verification waits for it. The overhead is learned per batch size from there.
            self.controller.sync_factor = 0.3
        # request id -> (position, token) the proposer guessed from the history before it
        self._guesses: dict[str, tuple[int, int]] = {}
        # Every `probe_every` steps without drafts, about probe_budget / batch requests guess.
        # (With 512, 16 suffix proposals every 4 steps at batch 32 cost open chat's speculating
        # steps about 0.3 ms each on the H200's host: 2.73 ms against 2.46 ms for plain ones.)
        self.probe_every, self.probe_max, self.probe_budget, self._probe_tick = 4, 64, 128, 0
        self._drafted: list[Request] = []  # requests given drafts this step
        # The proposer's first look at a request reads its whole prompt (a numpy scan now; it
        # was an index build, about 0.5 us a token, and the index is still built at the second
        # look). Past `first_look_from` decoding requests, a step looks first at no more than
        # `first_look_tokens` of history: on the H200, batch 256 rewriting fell to 187 requests
        # near its end, the controller planned drafts on its prior for most of them, and one
        # step spent 25 ms indexing their prompts (the step itself: 5.5 ms).
        self.first_look_from, self.first_look_tokens = 64, 2048
        self._seen: set[str] = set()  # requests the proposer has looked at
        self._live: dict[str | None, int] = {}  # job id -> its requests in the engine
        self.decided_job: str | None = None  # the job the governor decided the last step for
        if self.drafts_ahead:
            # Scored guesses keep every request's estimate current, so an estimate need not
            # fade toward the prior while the request is not drafting (the draft model has
            # no free guesses and keeps that fading).
            self.controller.idle_decay = 1.0

    def on_added(self, req: Request) -> None:
        self._live[req.job_id] = self._live.get(req.job_id, 0) + 1

    def should_speculate(self, num_running: int) -> bool:
        """The governor's call for this step, made for the job with the most requests in the
        engine (`decided_job`)."""
        if self.governor is None:
            return True
        if self._live:  # (with none, nothing runs)
            self.decided_job = max(self._live, key=self._live.__getitem__)
            self.governor.use_job(self.decided_job)
        return self.governor.speculate(num_running)

    def observe(self, batch: int, spec_mode: bool, tokens: int, seconds: float, rows: int = 0,
                drafted: bool = False, overlapped: bool = False, decode_only: bool = True,
                tainted: bool = False, running: int = 0, job: str | None = None, early: bool = False) -> None:
        """A finished step, for the governor and the controller to learn from: a decode step,
        and not one whose period holds another step's prefill launch (`tainted`). Prefill
        costs (an admission's eager launch is about 15 ms on SmolLM2) belong to neither mode;
        charged to the mode in force, they made that mode look slow. `batch`: the requests it
        sampled for (the controller prices the step by them); `running`: the requests running
        when it was planned, the batch size the governor decided for; `job`: the job it decided
        for."""
        if tainted or not decode_only:
            return
        # `early`: finished by the next call's wait, before that call launched its step. The
        # launch that a step's period holds went to the next one's, so the period reads short
        # (0.1-0.2 ms against 1.1 on the H200 at batch 32). The waiting call speculates: to the
        # governor that is a wash within speculating mode, but a plain-mode step would be
        # credited with it; and as a plain-step sample for the controller, it priced drafting
        # out (learned overhead 0.5 -> 3.9, copying at batch 32 from 1.45x to 1.14x).
        if self.governor is not None and (spec_mode or not early):
            self.governor.observe(running or batch, spec_mode, tokens, seconds, job)
        if self.adaptive and self.engine.async_output and (drafted or not early):
            self.controller.observe_step(batch, rows or batch, drafted, overlapped, seconds, decode_only)

    def take_build_seconds(self) -> float:
        """Seconds the proposer spent on one-time index builds since the last call."""
        s = getattr(self.proposer, "build_seconds", 0.0)
        if s:
            self.proposer.build_seconds = 0.0
        return s

    def clear_drafts(self) -> None:
        """Drop drafts a request was given but not scheduled with (they follow an older history)."""
        for r in self._drafted:
            r.spec_token_ids = []
            r.spec_assumed = []
        self._drafted = []

    def _decoding(self, running: list[Request]) -> tuple[list[Request], list[int]]:
        """Requests whose next step decodes, and the drafts each has room for: drafts never run
        past max_tokens or the model's context, counting the drafts still in flight."""
        k, max_len = self.k, self.engine.max_model_len
        reqs, caps = [], []
        for r in running:  # (one pass, no property calls: this runs every speculating step)
            n, out = len(r.prompt_token_ids) + len(r.output_token_ids), len(r.output_token_ids)
            if r.num_computed_tokens != n - 1:
                continue
            u = r.num_unverified
            c = min(k, r.params.max_tokens - out - 1 - u, max_len - n - 1 - u)
            reqs.append(r)
            caps.append(c if c > 0 else 0)
        return reqs, caps

    # ---- n-gram and suffix: drafts from the tokens on the host -----------------------------
    def would_draft(self, running: list[Request]) -> bool:
        """Would the controller plan drafts for anyone, on its estimates alone (no proposer)?"""
        if self.adaptive and not self.controller.can_pay(len(running)):
            return False
        reqs, caps = self._decoding(running)
        if not self.adaptive:
            return any(caps)
        return any(self.controller.choose_k([r.request_id for r in reqs], caps, forget_idle=False))

    def draft_ahead(self, running: list[Request], will_wait: bool = False) -> bool:
        """Give drafts to the decoding requests where they should pay. Never waits for the
        step in flight: it drafts from the tokens already on the host. Returns whether it
        decided to draft. `will_wait`: only decide; the engine then waits for the step in
        flight and drafts again from whole histories, so the decision needs no discount for
        what drafts would assume, and a request counts as a candidate as soon as its known
        history matches anything."""
        if self.adaptive and not self.controller.can_pay(len(running)):
            return False  # quick reject at large batches (fewer decoding rows are checked below)
        reqs, caps = self._decoding(running)
        if not reqs:
            return False
        if not self.adaptive:
            found = self._lookahead(reqs, caps, len(reqs))
            return any(f[3] for f in found) if will_wait else self._assign(reqs, found)
        if not self.controller.can_pay(len(reqs)):
            return False  # too large a batch for drafts to pay: spend no host time on them
        self._score_guesses(reqs)
        ids = [r.request_id for r in reqs]
        acc = self.controller.acceptances(ids)
        # Could drafting pay even if every request accepted as well as the best one does? If
        # not, skip the per-request choice (at batch 200 it cost 1-2 ms of host time a step).
        ks = None
        if self.controller.can_pay(len(reqs), max(acc)):
            # Drafts that continue tokens in flight hold only if those come out as expected.
            disc = [1.0 if will_wait else a ** self._assumed_len(r) for a, r in zip(acc, reqs)]
            ks = self.controller.choose_k(ids, caps, discount=disc, acceptance=acc)
        if ks is None or not any(ks):
            self._probe(reqs)
            return False
        # The controller assumed every planned request drafts. Ask the proposer which really
        # would and decide again over those alone (open chat: a few weak matches per step).
        planned = [i for i, k in enumerate(ks) if k > 0]
        if will_wait and any(reqs[i].inflight_drafts for i in planned):
            # A request verifying drafts right now is copying: it will match again, so the
            # engine waits anyway. Asking the proposer here would only repeat, on a shorter
            # history, the proposal made after the wait (the suffix proposer's costliest call).
            return True
        found = self._lookahead([reqs[i] for i in planned], [ks[i] for i in planned], len(reqs))
        if will_wait and all(f[3] for f in found):
            # Every planned request matched: deciding again over exactly the planned drafts
            # would give the same allocation (it was the best over more), so drafting it is.
            return True
        caps = [0] * len(reqs)
        for i, f in zip(planned, found):
            if will_wait:
                caps[i] = ks[i] if f[3] else 0
            else:
                caps[i] = len(f[0])
                disc[i] = acc[i] ** len(f[1])
        if not any(caps):
            return False
        # (`acc` still holds the planned requests' estimates: only idle ones faded since)
        ks = self.controller.choose_k(ids, caps, forget_idle=False, discount=disc, acceptance=acc)
        if will_wait:
            return any(ks)
        return self._assign([reqs[i] for i in planned], [(f[0][:ks[i]], f[1], f[2]) for i, f in zip(planned, found)])

    def _probe(self, reqs: list[Request]) -> None:
        """Nobody is worth drafting for on current evidence. Every few steps, guess anyway (no
        drafts): scored guesses are how a request that turned copyable earns its drafts back,
        and the only evidence a new request gets. A large batch probes fewer requests per
        step (the proposer's first look at a request builds its index), taking turns."""
        self._probe_tick += 1
        if self._probe_tick % self.probe_every:
            return
        n = min(len(reqs), max(4, min(self.probe_max, self.probe_budget // len(reqs))))
        start = (self._probe_tick // self.probe_every * n) % len(reqs)
        probe = (reqs + reqs)[start:start + n] if start + n > len(reqs) else reqs[start:start + n]
        self._lookahead(probe, [0] * len(probe), len(reqs))

    @staticmethod
    def _assumed_len(r: Request) -> int:
        return len(r.inflight_drafts) + 1 if r.num_pending else 0

    def _assign(self, reqs: list[Request], found: list[tuple]) -> bool:
        for r, (drafts, assumed, base, *_) in zip(reqs, found):
            if drafts:
                r.spec_token_ids, r.spec_assumed, r.spec_base = list(drafts), assumed, base
                self._drafted.append(r)
        return bool(self._drafted)

    def _lookahead(self, reqs: list[Request], ks: list[int], batch: int = 0
                   ) -> list[tuple[list[int], list[int], int, bool]]:
        """(drafts, assumed tokens, history length, whether the proposer matched anything) per
        request, from the tokens on the host. With more than `first_look_from` decoding
        requests (`batch`), requests new to the proposer beyond `first_look_tokens` of history
        are left for later steps (no drafts, no match).
        A request with a step in flight gets drafts that continue what that step is expected
        to produce: its drafts, all accepted (the proposer, asked for more tokens, must still
        propose them; where it now proposes something else, the drafts up to there and its token
        instead), then the proposer's guess at the token after them. That guess is scored
        for free once the token is known (`_score_guesses`): acceptance evidence for requests
        that do not draft, and the only evidence a request drafting nothing gets."""
        if batch > self.first_look_from:
            reqs, ks, skipped = self._first_looks(reqs, ks)
        else:
            skipped = None
        hists, wants = [], []
        for r, k in zip(reqs, ks):
            self._seen.add(r.request_id)
            if r.num_pending:  # the known history only: one copy, without the placeholders
                hists.append(r.prompt_token_ids + r.output_token_ids[:len(r.output_token_ids) - r.num_pending])
                wants.append(len(r.inflight_drafts) + 1 + k)
            else:
                hists.append(r.all_token_ids)
                wants.append(max(k, 1))
        props = self.proposer.propose([r.request_id for r in reqs], hists, wants,
                                      [r.job_id for r in reqs])
        out = []
        for r, h, f, k in zip(reqs, hists, props, ks):
            if not r.num_pending:
                if f and not k:
                    self._guesses[r.request_id] = (len(h), f[0])
                out.append((f[:k], [], len(h), bool(f)))
                continue
            # The step in flight is expected to accept its drafts as far as the proposer, with
            # the history it has now, would still propose them, and then to emit the proposer's
            # next token (the bonus, or the correction of the first draft it no longer agrees with).
            d = r.inflight_drafts
            j = 0
            while j < len(d) and j < len(f) and f[j] == d[j]:
                j += 1
            if j >= len(f):
                out.append(([], [], len(h), bool(f)))
                continue
            if not d:
                self._guesses[r.request_id] = (len(h), f[0])
            out.append((f[j + 1:j + 1 + k], f[:j + 1], len(h), True))
        if skipped:
            for i, r in skipped:  # back in the callers' order
                out.insert(i, ([], [], r.num_tokens - r.num_pending, False))
        return out

    def _first_looks(self, reqs: list[Request], ks: list[int]):
        """The requests (and their ks) to ask the proposer about this step: every one it has
        seen, and new ones while their histories fit `first_look_tokens` (the first always).
        Also the skipped ones, as (index, request)."""
        budget, kept, kept_k, skipped = self.first_look_tokens, [], [], []
        for i, (r, k) in enumerate(zip(reqs, ks)):
            if r.request_id not in self._seen:
                n = r.num_tokens
                if n > budget and budget < self.first_look_tokens:
                    skipped.append((i, r))
                    continue
                budget -= n
            kept.append(r)
            kept_k.append(k)
        return kept, kept_k, skipped

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

    # ---- draft model: drafts from the whole history (the step in flight is waited for) -----
    def plan(self, running: list[Request]) -> list[tuple[Request, int]]:
        """(request, k) for each decoding request that should draft this step. Needs no
        token values, so it can run while the previous step's tokens are still on the GPU."""
        if self.adaptive and not self.controller.can_pay(len(running)):
            return []
        reqs, caps = self._decoding(running)
        if not reqs:
            return []
        if not self.adaptive:
            return [(r, k) for r, k in zip(reqs, caps) if k > 0]
        if not self.controller.can_pay(len(reqs)):
            return []
        ks = self.controller.choose_k([r.request_id for r in reqs], caps)
        return [(r, k) for r, k in zip(reqs, ks) if k > 0]

    def propose(self, plan: list[tuple[Request, int]]) -> bool:
        """Set spec_token_ids for the planned requests still running; True if any got drafts."""
        plan = [(r, k) for r, k in plan if not r.is_finished]
        if not plan:
            return False
        hists = [r.all_token_ids for r, _ in plan]
        drafts = self.proposer.propose([r.request_id for r, _ in plan], hists, [k for _, k in plan],
                                       [r.job_id for r, _ in plan])
        return self._assign([r for r, _ in plan], [(d[:k], [], len(h)) for (r, k), d, h in zip(plan, drafts, hists)])

    # ---- verification, on the device -------------------------------------------------------
    def verify(self, reqs: list[Request], inp, logits: torch.Tensor, want_logprobs: bool = False):
        """Accept drafts exactly, without the host: returns, on the device, the newest token per
        request (the next step's input), the drafts accepted (the next step's shift), the
        emitted tokens padded, with the accepted count as a last column (one copy to the host),
        and the logprob of each emitted token when asked."""
        vr, drafts = inp.verify_rows, inp.draft_ids  # [N, K+1] rows of `logits`, [N, K] padded with -1
        N, K1 = vr.shape
        K = K1 - 1
        if all(r.params.greedy for r in reqs):
            # argmax per scored row first (no [N, K+1, V] copy), then one kernel for the rest
            last, acc, packed = ops.greedy_accept(logits.argmax(-1), vr, drafts)
            emitted = packed[:, :K1]
        else:
            V, dev = logits.shape[1], logits.device
            scored = logits[vr]  # [N, K+1, V]
            st = SamplingTensors.from_requests(reqs, V, dev)
            probs = processed_probs(scored.reshape(N * K1, V),
                                    st.repeat(torch.full((N,), K1, device=dev))).reshape(N, K1, V)
            flat = exponential_noise(reqs, V, dev, self.engine.default_generator, [K1] * N,
                                     offsets=inp.sample_offsets)
            noise = SpecNoise(exp=flat.reshape(N, K1, V), uniform=torch.rand(N, K, device=dev))
            out = rejection_sample(probs, drafts, (drafts >= 0).sum(1), greedy=st.temperature <= 0,
                                   target_argmax=scored.argmax(-1), noise=noise)
            emitted, acc = out.tokens, out.num_accepted
            last = emitted.gather(1, acc[:, None]).squeeze(1)
            packed = torch.cat([emitted, acc[:, None]], dim=1)
        lp = None
        if want_logprobs:
            lp = logits.float().log_softmax(-1)[vr.reshape(-1), emitted.clamp(min=0).reshape(-1)].view(N, K1)
        return last, acc, packed, lp

    def record(self, r: Request, proposed: int, accepted: int, assumed: list[int], base: int) -> None:
        """A verification's result reached the host. Drafts that continued tokens in flight
        say something about acceptance only if those tokens came out as assumed."""
        p = r.num_prompt_tokens
        valid = not assumed or r.output_token_ids[base - p:base - p + len(assumed)] == assumed
        self.controller.record(r.request_id, proposed, accepted, r.job_id, evidence=valid)
        r.spec_proposed += proposed
        r.spec_accepted += accepted
        c = self.engine.counters
        c["spec_proposed"] += proposed
        c["spec_accepted"] += accepted
        c["spec_verifications"] += 1

    def on_finished(self, req: Request) -> None:
        n = self._live.get(req.job_id, 0) - 1
        if n > 0:
            self._live[req.job_id] = n
        elif self._live.pop(req.job_id, None) is not None and self.governor is not None:
            self.governor.forget_job(req.job_id)
        self.proposer.on_finished(req.request_id, req.output_token_ids, req.job_id)
        self._seen.discard(req.request_id)
        self.controller.forget(req.request_id)
        self._guesses.pop(req.request_id, None)
