"""Adaptive speculation length: choose k per request per step so speculation never costs
more than it gives.

Per request we estimate a, the per-draft-token acceptance probability. With k drafts, a step
emits E(k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens in expectation. Verifying
sum(k_i + 1) tokens costs step_cost(sum(k_i + 1)) relative to a plain decode step; decode is
memory-bound (flat cost) until the batch of tokens makes it compute-bound (cost grows
linearly), which is why speculation pays at batch 1 and loses at batch 256.

Marginal gain of request i's j-th draft is a_i^j (decreasing in j), so for any total token
budget the best allocation takes the largest marginal gains across the batch; we scan budgets
and keep the one with the highest tokens per unit cost. A step with any drafts also pays
`sync_factor` x a plain step for running synchronously. k = 0 for everyone when nothing beats
plain decoding.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

StepCost = Callable[[int], float]


def batch_bucket(batch: int) -> int:
    """Batch sizes measured together, step times within one being alike: 1, 2, 3-4, 5-8, ...,
    17-32, ... A bucket ends at its power of two because batches do: with max_num_seqs = 32
    the batch moves between 32 (after an admission) and 31 or 30 (a request finished), and
    with buckets that began at 32, those steps were judged in two buckets, each from the few
    samples the other left it (H200, open chat at batch 32)."""
    return max(0, batch - 1).bit_length()


@dataclass
class StepCostModel:
    """Default cost of one forward over n tokens, in units of a small-batch decode step:
    flat (weights read once) up to `knee_tokens`, then linear; plus a per-token overhead
    (sampling, KV writes, attention over the context, proposer work)."""
    knee_tokens: int = 256
    per_token: float = 0.002

    def __call__(self, n: int) -> float:
        return max(1.0, n / self.knee_tokens) + self.per_token * n


@dataclass
class StepCostTable:
    """Measured (num_tokens, seconds) points from the engine, linearly interpolated and
    extrapolated linearly past the last point."""
    points: list[tuple[int, float]]

    def __post_init__(self) -> None:
        self.points = sorted(self.points)
        if not self.points:
            raise ValueError("StepCostTable needs at least one point")

    def __call__(self, n: int) -> float:
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        if len(xs) == 1 or n <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, n)
        if i >= len(xs):
            i = len(xs) - 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (n - x0) / max(1, x1 - x0)


@dataclass
class SpecStats:
    """Counters for metrics (per job and global). Prometheus/manifest read these."""
    steps: int = 0          # (request, step) verifications that carried >= 1 draft
    proposed: int = 0       # draft tokens verified
    accepted: int = 0       # draft tokens accepted
    emitted: int = 0        # tokens emitted by those verifications (accepted + 1 each)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens emitted per speculative step (vLLM's 'mean acceptance length')."""
        return self.emitted / self.steps if self.steps else 0.0

    def add(self, proposed: int, accepted: int) -> None:
        if proposed > 0:
            self.steps += 1
            self.proposed += proposed
            self.accepted += accepted
            self.emitted += accepted + 1


@dataclass
class _Acc:
    acc: float = 0.0     # EMA of accepted draft tokens
    trials: float = 0.0  # EMA of acceptance trials (accepted + 1 if a rejection happened)


@dataclass
class SpecController:
    max_k: int = 5
    step_cost: StepCost = field(default_factory=StepCostModel)
    decay: float = 0.8            # EMA decay per recorded step
    prior: float = 0.5            # acceptance assumed before evidence
    prior_weight: float = 2.0     # in trials
    # Speculate only if the model expects >= 10% more tokens per unit cost: drafting has costs
    # the model leaves out (requests finish unevenly, so admissions come one by one instead of
    # in bulk; a wait for the step in flight), and on the H200 in fp32 SmolLM2's drafting steps
    # at batch 32 gave what plain ones did per millisecond (9.1 against 9.3 tokens/ms, JSON).
    min_gain: float = 1.10
    # A step with drafts runs synchronously (the host needs the accepted tokens before it can
    # schedule the next step), so it loses the overlap of host work with the GPU: about half a
    # plain step on the GPU. Without this term, a flat cost at small batches makes any
    # acceptance above ~0.2% look worth drafting for.
    sync_factor: float = 0.5
    idle_decay: float = 0.95      # per step at k = 0: evidence fades toward the prior
    stats: SpecStats = field(default_factory=SpecStats)
    job_stats: dict[str, SpecStats] = field(default_factory=dict)
    _acc: dict[str, _Acc] = field(default_factory=dict)
    # Learned per batch-size bucket from the engine's step times (async output only): what a
    # drafting step really costs beyond the model's forward, in plain steps. On a small model
    # the host, not the GPU, sets the pace, and a drafting step (host work serialised with
    # the GPU, the proposer, verification) costs far more than `sync_factor` says.
    max_sync: float = 4.0
    sync_learn_rate: float = 0.3
    # Per overlapped plain step, a learned overhead fades this much back toward `sync_factor`.
    # It is only learned from drafting steps, so one slow spell (a noisy host) that priced
    # drafting out would otherwise stop drafting for good: measured on the H100, extraction
    # at batch 1 fell from 2.0x to 1.0x in some runs and not in others.
    sync_fade: float = 0.01
    _sync: dict[int, float] = field(default_factory=dict)
    recent_decay: float = 0.995  # per trial: about the last 200 trials count
    _recent_acc: float = 0.0
    _recent_trials: float = 0.0
    _plain_s: dict[int, float] = field(default_factory=dict)  # seconds of an overlapped plain step
    _can_pay: dict[tuple[int, float], bool] = field(default_factory=dict)

    bucket = staticmethod(batch_bucket)

    def sync_cost(self, batch: int) -> float:
        """Extra cost of a drafting step beyond its forward, in plain steps of this batch."""
        return self._sync.get(self.bucket(batch), self.sync_factor)

    def can_pay(self, batch: int, acceptance: float = 0.99) -> bool:
        """Could drafting pay at this batch size if every request accepted drafts this well
        (by default: nearly always)? When it cannot (large batches, where verifying extra rows
        makes the step compute-bound), the per-request choice is skipped: it would cost host
        time every step for nothing."""
        a = min(0.99, round(acceptance + 0.005, 2))  # (rounded up: never rejects what could pay)
        # Past 64, the batch rounded down to a multiple of 8 (a smaller batch pays more easily),
        # not below its bucket (whose learned overhead prices it): as a large batch finishes, a
        # request or a few a step, each size was a cache miss, about 60 us a step on the dev CPU.
        if batch > 64:
            batch = max(batch - batch % 8, (1 << (batch_bucket(batch) - 1)) + 1)
        key = (batch, round(self.sync_cost(batch), 1), a)
        ok = self._can_pay.get(key)
        if ok is None:
            if len(self._can_pay) > 4096:  # (the learned overhead drifts: old keys go stale)
                self._can_pay.clear()
            # Every request alike: the j-th drafts of all of them come before any (j+1)-th, so
            # the gains are in order without sorting (1,280 of them at batch 256).
            per = [a ** j for j in range(1, self.max_k + 1)]
            if self._numpy_scan(batch * self.max_k):
                ok = self._best_count_numpy(np.repeat(per, batch), batch) > 0
            else:
                ok = self._best_count([g for g in per for _ in range(batch)], batch) > 0
            self._can_pay[key] = ok
        return ok

    def observe_step(self, batch: int, rows: int, drafted: bool, overlapped: bool, seconds: float,
                     decode_only: bool = True) -> None:
        """One finished engine step. Overlapped plain decode steps set the plain step time; a
        drafting decode step's overhead is its time over a plain step's, less what the cost
        model already charges for its extra rows. (The plain step right after a drafting one
        also runs without overlap, but that is paid once per switch, not per drafting step.)
        Steps that also prefill say nothing about either and are left out."""
        if seconds <= 0 or not decode_only:
            return
        b = self.bucket(batch)
        plain = self._plain_s.get(b)
        if drafted:
            if plain:
                self._learn(b, seconds / plain - self.step_cost(rows) / self.step_cost(batch))
        elif overlapped:
            self._plain_s[b] = seconds if plain is None else 0.8 * plain + 0.2 * seconds
            old = self._sync.get(b)
            if old is not None:
                self._sync[b] = old + self.sync_fade * (self.sync_factor - old)

    def _learn(self, b: int, overhead: float) -> None:
        x = min(max(overhead, 0.0), self.max_sync)
        old = self._sync.get(b, self.sync_factor)
        self._sync[b] = old + self.sync_learn_rate * (x - old)

    def recent_acceptance(self) -> float:
        """Acceptance across recent requests, the prior for a new request: a batch job's
        requests do the same task, so the last ones say more than a fixed guess. Starts at
        `prior`; evidence fades with `recent_decay` per trial."""
        return (self._recent_acc + self.prior * self.prior_weight) / (self._recent_trials + self.prior_weight)

    def _add_recent(self, accepted: float, trials: float) -> None:
        f = self.recent_decay ** trials
        self._recent_acc = f * self._recent_acc + accepted
        self._recent_trials = f * self._recent_trials + trials

    def acceptance(self, request_id: str) -> float:
        s = self._acc.get(request_id)
        # A new request starts from what recent requests achieved; a request's own evidence is
        # blended with the fixed prior, so a request left idle fades toward it and is tried
        # again even where recent requests did poorly.
        if s is None:
            return min(self.recent_acceptance(), 0.99)
        a = (s.acc + self.prior * self.prior_weight) / (s.trials + self.prior_weight)
        return min(a, 0.99)

    def acceptances(self, request_ids: list[str]) -> list[float]:
        """`acceptance` of each request, the prior for new ones computed once."""
        new = min(self.recent_acceptance(), 0.99)
        get, pw, w = self._acc.get, self.prior * self.prior_weight, self.prior_weight
        out = []
        for rid in request_ids:
            s = get(rid)
            out.append(new if s is None else min((s.acc + pw) / (s.trials + w), 0.99))
        return out

    def choose_k(self, request_ids: list[str], max_k: list[int] | None = None,
                 forget_idle: bool = True, discount: list[float] | None = None,
                 acceptance: list[float] | None = None) -> list[int]:
        """k per request for this step. `max_k` caps per request (room left before
        max_tokens / max_model_len, proposer limits; 0 for a request with nothing to draft).
        `forget_idle=False` for a second look at the same step (no extra fading).
        `discount`: per request, the chance its drafts hold at all (drafts that continue
        tokens still in flight hold only if those come out as expected). `acceptance`: the
        requests' current estimates, where the caller already has them."""
        B = len(request_ids)
        if B == 0:
            return []
        caps = [min(self.max_k, m) for m in max_k] if max_k is not None else [self.max_k] * B
        if acceptance is None:
            acceptance = self.acceptances(request_ids)
        k = self._allocate(acceptance, caps, discount)
        if forget_idle:
            self._forget_idle(request_ids, k)
        return k

    # From this many drafts in a step's choice, numpy allocates them (the same k, bit for bit:
    # sequential products and sums in float64, a stable sort): at batch 200 with k = 8 the
    # Python sort and scan took 171 us a call on the dev CPU, a tenth of a bf16 step on the H200.
    numpy_from = 160  # (below it the Python loop is faster: 12 us against 21 at 64 drafts)

    def _numpy_scan(self, drafts: int) -> bool:
        """Whether a choice over this many drafts runs with numpy (the fixed cost model only)."""
        return type(self.step_cost) is StepCostModel and drafts >= self.numpy_from

    def _allocate(self, acceptance: list[float], caps: list[int],
                  discount: list[float] | None = None) -> list[int]:
        B = len(acceptance)
        if self._numpy_scan(sum(caps)):
            return self._allocate_numpy(acceptance, caps, discount)
        # The marginal expected tokens of every draft a request could get, best first (a
        # stable sort: ties go to the earlier request).
        gains: list[float] = []
        owner: list[int] = []
        for i, a in enumerate(acceptance):
            c = caps[i]
            if c <= 0:
                continue
            g = discount[i] if discount is not None else 1.0
            for _ in range(c):
                g *= a
                gains.append(g)
            owner.extend([i] * c)
        k = [0] * B
        if not gains:
            return k
        order = sorted(range(len(gains)), key=gains.__getitem__, reverse=True)
        for j in order[:self._best_count([gains[j] for j in order], B)]:
            k[owner[j]] += 1
        return k

    def _allocate_numpy(self, acceptance: list[float], caps: list[int],
                        discount: list[float] | None = None) -> list[int]:
        """`_allocate` and `_best_count` (the fixed cost model's scan) over arrays."""
        B, K = len(acceptance), max(max(caps), 0)
        k = np.zeros(B, dtype=np.int64)
        if K == 0:
            return k.tolist()
        # gains[i, j] = discount_i * a_i^(j+1), multiplied in the order the Python loop does
        steps = np.empty((B, K + 1))
        steps[:, 0] = discount if discount is not None else 1.0
        steps[:, 1:] = np.asarray(acceptance, dtype=np.float64)[:, None]
        gains = np.cumprod(steps, axis=1)[:, 1:]
        valid = np.arange(K)[None, :] < np.asarray(caps)[:, None]
        g, owner = gains[valid], np.nonzero(valid)[0]  # request-major, as the Python loop lists them
        if g.size == 0:
            return k.tolist()
        order = np.argsort(-g, kind="stable")
        m = self._best_count_numpy(g[order], B)
        np.add.at(k, owner[order[:m]], 1)
        return k.tolist()

    def _best_count_numpy(self, gains: np.ndarray, B: int) -> int:
        """`_best_count` for the fixed cost model, over an array of gains (best first)."""
        cost = self.step_cost
        plain = cost(B)
        base = B / plain
        sync = self.sync_cost(B) * plain
        tokens = np.cumsum(np.concatenate(([float(B)], gains)))[1:]  # (B + g1) + g2 ..., as the loop adds
        n = B + np.arange(1, gains.size + 1)
        rate = tokens / (np.where(n > cost.knee_tokens, n / cost.knee_tokens, 1.0) + cost.per_token * n + sync)
        falls = np.nonzero(rate[1:] < rate[:-1])[0]
        scanned = rate[:falls[0] + 1] if falls.size else rate  # the scan stops at the first fall
        m = int(np.argmax(scanned))
        return m + 1 if scanned[m] > base and scanned[m] >= base * self.min_gain else 0

    def _best_count(self, gains: list[float], B: int) -> int:
        """How many of the drafts (marginal gains, best first) to verify in a step of B
        requests: the count with the most tokens per unit cost, or 0 where none beats plain
        decoding by `min_gain`."""
        cost = self.step_cost
        plain = cost(B)
        base = B / plain
        sync = self.sync_cost(B) * plain
        best_m, best_rate, tokens = 0, base, float(B)
        if type(cost) is StepCostModel:
            # Inlined cost (this runs up to twice a step over every draft of the batch). The
            # cost is convex and the gains fall, so the rate rises to one peak and then falls:
            # the scan stops at the first fall.
            knee, per_token, prev = cost.knee_tokens, cost.per_token, 0.0
            for m, g in enumerate(gains, start=1):
                tokens += g
                n = B + m
                rate = tokens / ((n / knee if n > knee else 1.0) + per_token * n + sync)
                if rate < prev:
                    break
                prev = rate
                if rate > best_rate:
                    best_m, best_rate = m, rate
        else:
            for m, g in enumerate(gains, start=1):
                tokens += g
                rate = tokens / (cost(B + m) + sync)
                if rate > best_rate:
                    best_m, best_rate = m, rate
        return best_m if best_rate >= base * self.min_gain else 0

    def _forget_idle(self, request_ids: list[str], k: list[int]) -> None:
        """A request left at k = 0 gathers no evidence, so its estimate would never change:
        fade it toward the prior, and it gets probed again once its text may have turned
        copyable (extraction often starts with free text, then copies)."""
        for rid, ki in zip(request_ids, k):
            s = self._acc.get(rid) if ki == 0 else None
            if s is not None:
                s.acc *= self.idle_decay
                s.trials *= self.idle_decay

    def record(self, request_id: str, proposed: int, accepted: int, job_id: str | None = None,
               evidence: bool = True) -> None:
        """After verification: `proposed` drafts were verified, `accepted` of them passed.
        `evidence=False`: counted in the stats, but the drafts followed a wrong assumption
        about the tokens before them, so they say nothing about this request's acceptance."""
        if proposed <= 0:
            return  # no evidence (k = 0 or the proposer found nothing)
        self.stats.add(proposed, accepted)
        if job_id is not None:
            self.job_stats.setdefault(job_id, SpecStats()).add(proposed, accepted)
        if not evidence:
            return
        s = self._acc.setdefault(request_id, _Acc())
        # Per-token acceptance is a geometric trial: accepted successes, plus one failure if
        # it stopped early. accepted/proposed would understate a for larger k.
        trials = accepted + (1 if accepted < proposed else 0)
        s.acc = self.decay * s.acc + accepted
        s.trials = self.decay * s.trials + trials
        self._add_recent(accepted, trials)

    def record_guess(self, request_id: str, hit: bool) -> None:
        """Free evidence: the proposer's guess for a token the request has since produced
        (see SpecDecoder._lookahead) was right or wrong. One trial of the first draft
        position, with no verification paid and nothing counted in the stats."""
        s = self._acc.setdefault(request_id, _Acc())
        s.acc = self.decay * s.acc + (1 if hit else 0)
        s.trials = self.decay * s.trials + 1
        self._add_recent(1 if hit else 0, 1)

    def forget(self, request_id: str) -> None:
        self._acc.pop(request_id, None)
