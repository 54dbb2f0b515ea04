"""Per-step trace of an engine (diagnostics): for each finished step, its period and, with
speculation, the governor's mode, whether it drafted or overlapped, the controller's learned
drafting overhead, and the host time spent since the last step in drafting, the proposer,
waiting for the step in flight and indexing finished requests. `bench.spec --trace FILE`
writes one JSON line per step, labelled with its run, to find where a slow run lost time."""
from __future__ import annotations

import gc
import time
from collections import defaultdict


class StepTrace:
    def __init__(self, eng) -> None:
        self.eng = eng
        self.steps: list[dict] = []
        self._host: dict[str, float] = defaultdict(float)
        # Garbage collections land in whichever step allocates past the threshold: their time
        # (per generation) goes with that step's host timers.
        self._gc_t0 = 0.0
        gc.callbacks.append(self._on_gc)
        # Forwards that ran eagerly (no captured graph): their rows, per step
        self._eager: list[int] = []
        self._wrap(eng.runner, "forward", self._on_forward)
        spec = eng.spec
        if spec is None:
            self._wrap(eng, "_record_step", self._on_record)
            return
        self._wrap(spec, "draft_ahead", timer="draft_ahead")
        self._wrap(spec, "should_speculate", timer="governor")
        self._wrap(spec.proposer, "propose", timer="propose")
        self._wrap(spec, "on_finished", timer="on_finished")
        self._wrap(eng, "_wait_inflight", timer="wait")
        self._wrap(spec, "observe", self._on_observe)
        self._wrap(spec, "take_build_seconds", self._on_build)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self.eng.has_unfinished():  # (every engine's trace hears every collection)
            self._host[f"gc{info['generation']}"] += time.perf_counter() - self._gc_t0

    def _wrap(self, obj, name: str, after=None, timer: str | None = None) -> None:
        fn = getattr(obj, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if timer:
                self._host[timer] += time.perf_counter() - t0
            if after is not None:
                after(out, *a, **kw)
            return out
        setattr(obj, name, wrapper)

    def _on_build(self, seconds) -> None:
        self._host["build"] += seconds  # (index builds, left out of the step's learned time)

    def _on_forward(self, _out, inp) -> None:
        r = self.eng.runner
        B = int(inp.meta.block_tables.shape[0])
        if not (inp.meta.is_decode and r.graphs and B <= max(r.graphs)):
            self._eager.append(B)

    def _host_ms(self) -> dict:
        # (swapped out first: a collection can start inside the loop, and its callback adds a key)
        host, self._host = self._host, defaultdict(float)
        out = {f"{k}_ms": round(v * 1e3, 3) for k, v in host.items() if v}
        if self._eager:  # rows of the forwards that ran eagerly since the last step
            out["eager_rows"] = sum(self._eager)
            self._eager.clear()
        return out

    def _on_record(self, period, inp, *_a, **_kw) -> None:
        m = inp.meta
        self.steps.append({"ms": round(period * 1e3, 3), "rows": int(m.block_tables.shape[0]),
                           "decode": bool(m.is_decode), **self._host_ms()})

    def _on_observe(self, _out, batch, spec_mode, tokens, seconds, rows=0, drafted=False, overlapped=False,
                    decode_only=True, tainted=False, running=0, job=None, early=False) -> None:
        c = self.eng.spec.controller
        self.steps.append({"ms": round(seconds * 1e3, 3), "batch": batch, "running": running, "spec": bool(spec_mode),
                           "tokens": tokens, "rows": rows, "drafted": bool(drafted), "overlapped": bool(overlapped),
                           "decode": bool(decode_only), "tainted": bool(tainted), "early": bool(early),
                           "sync": round(c.sync_cost(batch), 3), **self._host_ms()})

    def take(self) -> list[dict]:
        out, self.steps = self.steps, []
        self._host.clear()
        self._eager.clear()
        return out
