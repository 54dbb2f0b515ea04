"""GPU microbenchmark of the attention kernels against a device-to-device copy.

python bench/kernels.py   -> table on stdout, JSON to $OUT/kernels.json or bench/results/kernels.json
"""
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.cascade_attention import cascade_decode_attention, concat_block_tables, group_layout  # noqa: E402
from kernels.decode_attention import gather_kv, paged_decode_attention  # noqa: E402

SHAPES = {"qwen3-0.6b": (16, 8, 128), "smollm2-135m": (9, 3, 64)}  # query heads, kv heads, head dim
HQ, HKV, D = SHAPES["qwen3-0.6b"]
BS = 16
DT = torch.bfloat16


def copy_bandwidth():
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300)
    return 2 * src.numel() / ms / 1e6  # read + write, GB/s


def graph_bench(fn):
    """GPU time per call (ms) replayed from a CUDA graph, as the engine runs decode: no launch overhead."""
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=100)


def sdpa_gather(q, k_cache, v_cache, bt, ctx_len):
    """Baseline: gather the pages into dense K/V, then SDPA (uniform lengths, no mask)."""
    k = gather_kv(k_cache, bt, ctx_len).transpose(1, 2)
    v = gather_kv(v_cache, bt, ctx_len).transpose(1, 2)
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def make_cache(num_blocks):
    k = torch.randn(num_blocks, BS, HKV, D, device="cuda", dtype=DT)
    return k, torch.randn_like(k)


def bench_decode(fig):
    for B in (1, 64, 256):
        for ctx in (512, 2048):
            nb = ctx // BS
            k, v = make_cache(B * nb)
            bt = torch.randperm(B * nb, device="cuda").view(B, nb).to(torch.int32)
            lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
            q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
            kv_bytes = 2 * B * ctx * HKV * D * k.element_size()
            t_tri = graph_bench(lambda: paged_decode_attention(q, k, v, bt, lens, D ** -0.5))
            t_ref = graph_bench(lambda: sdpa_gather(q, k, v, bt, ctx))
            name = f"decode_B{B}_ctx{ctx}"
            fig[f"{name}_triton_us"] = t_tri * 1e3
            fig[f"{name}_sdpa_gather_us"] = t_ref * 1e3
            fig[f"{name}_triton_GBps"] = kv_bytes / t_tri / 1e6
            del k, v


def bench_cascade(fig, B=256, prefix=768, suffix=256):
    np_, ns = prefix // BS, suffix // BS
    k, v = make_cache(np_ + B * ns)
    pbt = torch.arange(np_, device="cuda", dtype=torch.int32).view(1, np_)
    plens = torch.tensor([prefix], device="cuda", dtype=torch.int32)
    sg = torch.zeros(B, device="cuda", dtype=torch.int32)
    sbt = (np_ + torch.randperm(B * ns, device="cuda")).view(B, ns).to(torch.int32)
    slens = torch.full((B,), suffix, device="cuda", dtype=torch.int32)
    q = torch.randn(B, HQ, D, device="cuda", dtype=DT)
    tables, lens = concat_block_tables(pbt, plens, sg, sbt, slens, BS)
    tok = 2 * HKV * D * k.element_size()
    t_plain = graph_bench(lambda: paged_decode_attention(q, k, v, tables, lens, D ** -0.5))
    gcu, order = group_layout(sg, 1)
    t_casc = graph_bench(lambda: cascade_decode_attention(q, k, v, pbt, plens, gcu, order, sbt, slens, D ** -0.5))
    name = f"cascade_B{B}_prefix{prefix}_suffix{suffix}"
    fig[f"{name}_plain_us"] = t_plain * 1e3
    fig[f"{name}_cascade_us"] = t_casc * 1e3
    fig[f"{name}_speedup"] = t_plain / t_casc
    fig[f"{name}_plain_GBps"] = B * (prefix + suffix) * tok / t_plain / 1e6  # logical KV read
    fig[f"{name}_cascade_unique_GBps"] = (prefix + B * suffix) * tok / t_casc / 1e6  # distinct KV bytes


def main():
    global HQ, HKV, D
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b", help="attention shape")
    ap.add_argument("--name", default="kernels", help="result file name")
    args = ap.parse_args()
    HQ, HKV, D = SHAPES[args.shape]
    torch.manual_seed(0)
    baseline = {"d2d_copy_GBps": copy_bandwidth()}
    fig = {}
    bench_decode(fig)
    bench_cascade(fig)
    bench_cascade(fig, B=256, prefix=1024, suffix=192)  # prefix bench workload (a) in its decode phase
    bench_cascade(fig, B=64, prefix=1536, suffix=96)  # one few-shot template's questions, workload (b)
    for key in list(fig):
        if key.endswith("GBps"):
            fig[key.replace("GBps", "pct_of_copy")] = 100 * fig[key] / baseline["d2d_copy_GBps"]
    from bench.common import git_commit
    commit = git_commit()  # PREFIXQ_COMMIT first: the device's copy may carry a stale .git
    res = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "commit": commit, "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
           "shape": args.shape, "figures": fig, "baseline": baseline}
    print(f"{'name':58s} {'value':>12s}")
    for k, val in {**baseline, **fig}.items():
        print(f"{k:58s} {val:12.1f}")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{args.name}.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
