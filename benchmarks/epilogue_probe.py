"""Where the TMA GEMM loses to cuBLAS: the plain product, the rank step, the tile config (GPU time).

    python benchmarks/epilogue_probe.py [--rounds 3] [--baseline PATH]

Problems (bf16, M = 8192, the layer's layouts, pm given): fwd y = x W^T + pm (s B)^T, bwd dx = dy W + pm (s A).
Variants:
  mm          cuBLAS, the frozen product alone (x @ W^T or dy @ W)
  gemm        the TMA GEMM as the library runs it, autotuned
  gemm_cfg    the same, one forced config (BM128 BN256 BK64, 3 stages, 8 warps, GROUP_M 8, split store at r=64)
  norank      gemm_cfg's kernel without the rank step (timing only: the low-rank term is missing)
  baseline    with --baseline PATH (another version of triton_lora.py, e.g. from git show), its gemm_cfg
The variants built from a patched copy of triton_lora.py are timing only.  Median of per-variant
do_bench_cudagraph times over --rounds rotated rounds.  Writes $OUT/epilogue_probe.json; table last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import patched_copy, rotated_cudagraph_us, run_env, write_json  # noqa: E402
from fuse_proj_probe import force, problem  # noqa: E402

from automodel_lora.kernels import triton_lora as T  # noqa: E402

RANK_STEP = """        if qt.dtype == pt.dtype:
            acc = tl.dot((pt.to(tl.float32) * scale).to(pt.dtype), qt, acc)
        else:
            acc = tl.dot(pt, (qt.to(tl.float32) * scale).to(pt.dtype), acc)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", help="another triton_lora.py to time as 'baseline' (its forced config)")
    args = ap.parse_args()
    forced = patched_copy(T.__file__, "forced")
    norank = patched_copy(T.__file__, "norank", (RANK_STEP, ""))
    baseline = patched_copy(args.baseline, "baseline") if args.baseline else None
    rows = []
    for K, N, r, direction in ((4096, 4096, 16, "fwd"), (4096, 4096, 16, "bwd"), (4096, 4096, 64, "fwd"),
                               (4096, 4096, 64, "bwd"), (4096, 14336, 16, "fwd"), (14336, 4096, 16, "fwd")):
        a, b, rop, q = problem(direction, K, N, r)
        pm = T.proj(a, rop)
        for mod in (forced, norank, baseline):
            if mod is not None:
                force(mod, a, b, pm, q, r)
        fns = {"mm": lambda: torch.mm(a, b),
               "gemm": lambda: T.gemm_lora(a, b, pm, q, 2.0, tma=True),
               "gemm_cfg": lambda: forced.gemm_lora(a, b, pm, q, 2.0, tma=True),
               "norank": lambda: norank.gemm_lora(a, b, pm, q, 2.0, tma=True)}
        if baseline is not None:
            fns["baseline"] = lambda: baseline.gemm_lora(a, b, pm, q, 2.0, tma=True)
        ref = (a.float() @ b.float() + pm.float() @ (2.0 * q.float()))
        errs = {n: ((fns[n]().float() - ref).norm() / ref.norm()).item() for n in fns if n not in ("mm", "norank")}
        times = rotated_cudagraph_us(fns, args.rounds, rep=100)
        row = dict(K=K, N=N, r=r, dir=direction, rel_err=errs, **{n: statistics.median(v) for n, v in times.items()},
                   all_times=times)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "all_times"}, flush=True)
    print("wrote", write_json("epilogue_probe.json", dict(env=run_env(), autotune=T.autotune_choices(), rows=rows)))
    cols = ["mm", "gemm", "gemm_cfg", "norank"] + (["baseline"] if baseline is not None else [])
    print("\n| K, N | r | dir | " + " | ".join(f"{c} us" for c in cols) + " | gemm/mm | norank/mm |")
    print("|---" * (len(cols) + 5) + "|")
    for row in rows:
        print(f"| {row['K']}, {row['N']} | {row['r']} | {row['dir']} | " + " | ".join(f"{row[c]:.1f}" for c in cols)
              + f" | {row['gemm'] / row['mm']:.3f} | {row['norank'] / row['mm']:.3f} |")


if __name__ == "__main__":
    main()
