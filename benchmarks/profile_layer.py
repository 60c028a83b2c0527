"""Where a LoRA layer step's time goes: GPU kernel time vs wall time, per kernel.

    python benchmarks/profile_layer.py [--shapes 4096x4096] [--ranks 16,64]

For each variant (frozen, torch, triton; triton_cublas / triton_tma force the base GEMM) at bf16,
M = 8192: the eager step time (CUDA events, median), the same step replayed from a CUDA graph
(GPU time without host launch cost), and the torch.profiler kernel list of one step. A gap between
eager and graph time is host overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_lora import base_gemm_for, lora_copy, time_block  # noqa: E402


def event_ms(step, n=30):
    return statistics.median(time_block(lambda i: step(), n))


def graph_ms(step):
    """GPU time of one step replayed from a CUDA graph (no host launch cost)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(step, rep=30, return_mode="median")


def kernel_table(step, steps=5):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps, e.count / steps, e.key[:90]))
    rows.sort(reverse=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--variants", default="frozen,torch,triton,triton_cublas,triton_tma",
                    help="triton_cublas / triton_tma: the kernel path with that base GEMM forced (bench_lora.py)")
    args = ap.parse_args()
    dt, dev, M = torch.bfloat16, "cuda", args.M
    summary = []
    for shape in args.shapes.split(","):
        Kd, N = (int(v) for v in shape.split("x"))
        for r in (int(v) for v in args.ranks.split(",")):
            torch.manual_seed(0)
            lin = nn.Linear(Kd, N, bias=False, device=dev, dtype=dt).requires_grad_(False)
            x = torch.randn(M, Kd, device=dev, dtype=dt, requires_grad=True)
            g = torch.randn(M, N, device=dev, dtype=dt)
            want = args.variants.split(",")
            variants = {"frozen": lin}
            A0 = (torch.randn(r, Kd, device=dev) / Kd**0.5).to(dt)
            B0 = (torch.randn(N, r, device=dev) * 0.05).to(dt)
            variants["torch"] = lora_copy(lin, r, A0, B0, False, share_weight=True)[0]
            tri = lora_copy(lin, r, A0, B0, True, share_weight=True)[0]
            for name in ("triton", "triton_cublas", "triton_tma"):
                variants[name] = tri
            variants = {k: v for k, v in variants.items() if k in want}
            for name, mod in variants.items():
                params = [p for p in mod.parameters() if p.requires_grad]

                def step(mod=mod, params=params, name=name):
                    x.grad = None
                    for p in params:
                        p.grad = None
                    with base_gemm_for(name):
                        mod(x).backward(g)

                for _ in range(5):
                    step()
                eager = event_ms(step)
                try:
                    graphed = graph_ms(step)
                except Exception as e:  # capture can fail (e.g. a host sync); report it
                    print(f"graph capture failed for {name}: {e!r}")
                    graphed = float("nan")
                kt = kernel_table(step)
                gpu = sum(t for t, _, _ in kt) / 1e3
                summary.append((Kd, N, r, name, eager, graphed, gpu))
                print(f"\n### {Kd}x{N} r={r} {name}: eager {eager:.3f} ms, graph {graphed:.3f} ms, kernel sum {gpu:.3f} ms")
                for t, c, k in kt[:14]:
                    print(f"  {t:8.1f} us  x{c:.0f}  {k}")
            variants = x = g = lin = None
            torch.cuda.empty_cache()
    print("\n| K, N | r | variant | eager ms | graph ms | kernel sum ms |")
    print("|---|---|---|---|---|---|")
    for Kd, N, r, name, e, gr, k in summary:
        print(f"| {Kd}, {N} | {r} | {name} | {e:.3f} | {gr:.3f} | {k:.3f} |")


if __name__ == "__main__":
    main()
