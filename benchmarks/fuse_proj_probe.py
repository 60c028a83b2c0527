"""Where the time of the fused projection (FUSE_PROJ) goes: the TMA GEMM alone, per problem (GPU time).

    python benchmarks/fuse_proj_probe.py [--rounds 3] [--kn 4096x4096,...] [--variants fused,fused_p9,...]

Problems (bf16, M = 8192, the layer's layouts): fwd y = x W^T + (x A^T)(s B)^T, bwd dx = dy W + (dy B)(s A).
Variants, all with one forced config (BM128 BN256 BK64, 3 stages, 8 warps, GROUP_M 8, split store at r=64):
  proj        the proj pass alone
  gemm        the TMA GEMM with pm given (what runs after proj without FUSE_PROJ)
  fused       gemm_lora_proj as in the library
  fused_nowait  the same kernel with the GEMM tiles' flag checks removed (timing only: may read pm early)
  fused_nodot   the same kernel without the projection tiles' dot (timing only: pm is wrong)
  fused_p9, fused_p12  the projection tiles' loop with 9 / 12 stages in flight instead of 6 (16-bit Rop)
The two timing-only variants are built from a patched copy of triton_lora.py.  Median of per-variant
do_bench_cudagraph times over --rounds rotated rounds.  Writes $OUT/fuse_proj_probe.json; table last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import patched_copy, rotated_cudagraph_us, run_env, write_json  # noqa: E402

from automodel_lora.kernels import triton_lora as T  # noqa: E402

PATCHES = {
    "fused_nowait": ('''            if not all_ready:
                all_ready = tl.atomic_add(flag_ptr + num_m, 0, sem="acquire", scope="gpu") == num_m
                if not all_ready:
                    while tl.atomic_add(flag_ptr + pid_m, 0, sem="acquire", scope="gpu") == 0:
                        pass
''', ""),
    "fused_nodot": ("                    pacc = tl.dot(a, rt.to(a.dtype), pacc)\n", ""),
    "fused_p9": ("num_stages=STAGES * (3 - R_BYTES // 2)", "num_stages=9"),
    "fused_p12": ("num_stages=STAGES * (3 - R_BYTES // 2)", "num_stages=12"),
}
EXACT = ("fused", "fused_p9", "fused_p12")  # the variants that compute the right result


def force(mod, a, b, pm, q, r, rop=None):
    cfg = dict(BM=128, BN=256, BK=64, GROUP_M=8, STAGES=3, SPLIT_STORE=r > 32)
    mod._PLANS[("tma_gemm", mod._tma_plan_key(a, b, pm, q, False, rop))] = (cfg, 8, 3)


def problem(direction, K, N, r, M=8192, dev="cuda", dt=torch.bfloat16):
    """(a, b, rop, q): out = a @ b + (a @ rop) @ (s q), the layer's layouts."""
    W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    A = torch.randn(r, K, device=dev, dtype=dt) / K**0.5
    B = torch.randn(N, r, device=dev, dtype=dt) * 0.05
    if direction == "fwd":
        return torch.randn(M, K, device=dev, dtype=dt), W.t(), A.t(), B.t()
    return torch.randn(M, N, device=dev, dtype=dt), W, B, A


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kn", default="4096x4096,4096x14336,14336x4096", help="comma-separated KxN problems")
    ap.add_argument("--variants", default=",".join(PATCHES), help="comma-separated patched variants")
    args = ap.parse_args()
    mods = {"fused": T, **{n: patched_copy(T.__file__, n, PATCHES[n]) for n in args.variants.split(",") if n}}
    rows = []
    for K, N in (tuple(int(v) for v in kn.split("x")) for kn in args.kn.split(",")):
        for r in (16, 64):
            for direction in ("fwd", "bwd"):
                a, b, rop, q = problem(direction, K, N, r)
                pm = T.proj(a, rop)
                force(T, a, b, pm, q, r)
                fns = {"proj": lambda: T.proj(a, rop), "gemm": lambda: T.gemm_lora(a, b, pm, q, 2.0, tma=True)}
                ref = T.gemm_lora(a, b, pm, q, 2.0, tma=True).float()
                errs = {}
                for name, mod in mods.items():
                    force(mod, a, b, pm, q, r, rop)
                    fn = (lambda m: lambda: m.gemm_lora_proj(a, b, rop, q, 2.0))(mod)
                    try:
                        out = fn()[0]
                    except Exception as e:  # e.g. a stage count whose buffers do not fit in shared memory
                        print(f"{name} skipped at K={K} N={N} r={r} {direction}: {type(e).__name__}", flush=True)
                        continue
                    fns[name] = fn
                    if name in EXACT:
                        errs[name] = ((out.float() - ref).norm() / ref.norm()).item()
                times = rotated_cudagraph_us(fns, args.rounds, rep=100)
                row = dict(K=K, N=N, r=r, dir=direction, rel_err_vs_gemm=errs,
                           **{n: statistics.median(v) for n, v in times.items()})
                rows.append(row)
                print(row, flush=True)
    print("wrote", write_json("fuse_proj_probe.json", dict(env=run_env(), rows=rows)))
    cols = ["proj", "gemm", *mods]
    print("\n| K, N | r | dir | " + " | ".join(f"{c} us" for c in cols) + " | proj+gemm - fused us |")
    print("|---" * (len(cols) + 4) + "|")
    for row in rows:
        print(f"| {row['K']}, {row['N']} | {row['r']} | {row['dir']} | "
              + " | ".join(f"{row[c]:.1f}" if c in row else "-" for c in cols)
              + f" | {row['proj'] + row['gemm'] - row['fused']:.1f} |")


if __name__ == "__main__":
    main()
