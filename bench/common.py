"""Shared pieces of the benchmarks: the result file format, device facts, workloads."""
from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str = "auto") -> str:
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def git_commit() -> str:
    if os.environ.get("PREFIXQ_COMMIT"):
        return os.environ["PREFIXQ_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, figures: dict, baseline: dict, device: str, extra: dict | None = None,
                 out_dir: str | None = None) -> Path:
    """bench/results/<name>.json (or $OUT/<name>.json on the GPU machine)."""
    out = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    flat = lambda d: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    doc = {"device": device, "date": dt.date.today().isoformat(), "commit": git_commit(),
           "command": " ".join(["python"] + sys.argv), "figures": flat(figures), "baseline": flat(baseline)}
    if extra:
        doc.update(extra)
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def parse_len(spec: str) -> tuple[int, int]:
    """'128' or '100:1024' (uniform, inclusive)."""
    lo, _, hi = spec.partition(":")
    return int(lo), int(hi or lo)


def random_lengths(n: int, spec: str, rng: random.Random) -> list[int]:
    lo, hi = parse_len(spec)
    return [rng.randint(lo, hi) for _ in range(n)]


def random_prompts(lengths: list[int], vocab: int, rng: random.Random) -> list[list[int]]:
    # Avoid the low ids, where special tokens usually live.
    return [[rng.randrange(1000, vocab) for _ in range(n)] for n in lengths]


def copy_bandwidth_gbs(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), the roofline we compare to."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * iters / (start.elapsed_time(end) / 1e3) / 1e9


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def print_table(title: str, rows: list[tuple[str, dict]], keys: list[str]) -> None:
    print(f"\n{title}")
    print("| system | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, d in rows:
        cells = [f"{d[k]:,.2f}" if isinstance(d.get(k), float) else str(d.get(k, "-")) for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
