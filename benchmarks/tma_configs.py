"""Every autotune config of the library's TMA LoRA GEMM against cuBLAS, per problem (GPU time).

    python benchmarks/tma_configs.py [--shapes 4096x14336,14336x4096] [--ranks 16,64] [--rounds 5]

Problems (bf16, M = 8192, s = 2.0), as the layer runs them:
  fwd: y  = x @ W^T + xa @ (s B)^T      (B operand stored (N, K): B_NK)
  bwd: dx = dy @ W  + dyB @ (s A)
Variants: `mm` (cuBLAS frozen GEMM, the floor), `cublas_path` (the library's cuBLAS route:
expand the low-rank term, then `addmm_` with beta=1), and `gemm_lora` forced to each config of
`_tma_gemm_tuned` in turn. Each is checked against an fp32 reference (relative max error), then
timed from a CUDA graph (do_bench_cudagraph, median) in `--rounds` rounds that visit the variants
in a rotating order (H100 clocks drift under sustained GEMMs); the median round is reported with
the spread of the rounds. Writes $OUT/tma_configs.json (OUT defaults to "."); table last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import rotated_cudagraph_us, run_env, write_json  # noqa: E402

from automodel_lora.kernels import triton_lora as T  # noqa: E402


def cfg_name(cfg) -> str:
    kw = cfg.kwargs
    return (f"{kw['BM']}x{kw['BN']}/s{kw['STAGES']}/w{cfg.num_warps}/g{kw['GROUP_M']}"
            + ("/split" if kw["SPLIT_STORE"] else ""))


def force_plan(x, y, pm, q, cfg) -> None:
    """Make gemm_lora launch `cfg` for this problem (no bias): the plan `_gemm_lora_tma` looks up. The
    kernels recorded for earlier plans are dropped, so the next call compiles and records `cfg`."""
    T._PLANS[("tma_gemm", T._tma_plan_key(x, y, pm, q, has_bias=False))] = (dict(cfg.kwargs), cfg.num_warps,
                                                                          cfg.num_stages)
    T._COMPILED.clear()
    T._TMA_BLOCKS.clear()


def problem(direction, K, N, r, dev="cuda", dt=torch.bfloat16):
    """(a, b, pm, q): out = a @ b + pm @ (s q) with the layer's layouts."""
    M = 8192
    W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    if direction == "fwd":
        a = torch.randn(M, K, device=dev, dtype=dt)
        B = torch.randn(N, r, device=dev, dtype=dt) * 0.05
        pm = torch.randn(M, r, device=dev, dtype=dt)
        return a, W.t(), pm, B.t()
    a = torch.randn(M, N, device=dev, dtype=dt)
    A = torch.randn(r, K, device=dev, dtype=dt) / K**0.5
    pm = torch.randn(M, r, device=dev, dtype=dt)
    return a, W, pm, A


def main():

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x14336,14336x4096")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="", help="time only the configs whose name contains this (e.g. BN256/s3)")
    args = ap.parse_args()
    s = 2.0
    rows = []
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        for r in (int(v) for v in args.ranks.split(",")):
            for direction in ("fwd", "bwd"):
                torch.manual_seed(0)
                a, b, pm, q = problem(direction, K, N, r)
                ref = a.float() @ b.float() + pm.float() @ (s * q.float())
                out_c = torch.empty(ref.shape, device="cuda", dtype=a.dtype)
                variants = {
                    "mm": lambda: torch.mm(a, b, out=out_c),
                    "cublas_path": lambda: T.expand(pm, q, s).addmm_(a, b),
                }
                errs = {"cublas_path": ((variants["cublas_path"]().float() - ref).abs().max() / ref.abs().max()).item()}
                for cfg in T._tma_gemm_tuned.configs:
                    name = cfg_name(cfg)
                    if args.only not in name:
                        continue
                    try:
                        force_plan(a, b, pm, q, cfg)
                        out = T.gemm_lora(a, b, pm, q, s, tma=True)
                        torch.cuda.synchronize()
                    except Exception as e:  # a config that does not fit (shared memory) is reported, not timed
                        print(f"{direction} {K}x{N} r={r} {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    errs[name] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    variants[name] = (lambda cfg=cfg: (force_plan(a, b, pm, q, cfg),
                                                       T.gemm_lora(a, b, pm, q, s, tma=True)))
                names = list(variants)
                times = rotated_cudagraph_us(variants, args.rounds, rep=30)
                mm = statistics.median(times["mm"])
                for n in names:
                    med = statistics.median(times[n])
                    rows.append(dict(direction=direction, K=K, N=N, r=r, variant=n, us=med, vs_mm=med / mm,
                                     spread=(max(times[n]) - min(times[n])) / med, err=errs.get(n)))
                print(f"[{direction} {K}x{N} r={r}] " + ", ".join(f"{d['variant']}={d['us']:.0f}" for d in rows[-len(names):]),
                      flush=True)
                a = b = pm = q = ref = out_c = None
                torch.cuda.empty_cache()
    env = run_env()
    path = write_json("tma_configs.json", dict(env=env, rows=rows))
    print(f"wrote {path}\n{env}")
    print("| dir | K, N | r | variant | us | vs mm | spread | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for d in rows:
        err = "-" if d["err"] is None else f"{d['err']:.1e}"
        print(f"| {d['direction']} | {d['K']}, {d['N']} | {d['r']} | {d['variant']} | {d['us']:.0f} | "
              f"{d['vs_mm']:.3f} | {d['spread']:.3f} | {err} |")


if __name__ == "__main__":
    main()
