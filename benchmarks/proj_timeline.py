"""Where the programs of the fused TMA GEMM (FUSE_PROJ) spend their time: per-program timestamps, and GPU time.

    python benchmarks/proj_timeline.py [--rounds 3] [--problems 4096x4096x64xfwd,...] [--variants lead1,front,...]

Every variant is a patched copy of triton_lora.py whose TMA GEMM kernel writes, per program, %globaltimer when it
starts, when its projection tiles start and end, and when it ends (into its lock buffer, past the flags), run with
one forced config (BM128 BN256 BK64, 3 stages, 8 warps, GROUP_M 8, split store at r=64):
  lead1          the library's kernel: a short program makes its rows of P one round before they are needed
  lead0, lead2   zero or two rounds before
  front          every projection before the program's GEMM tiles (the schedule before Version 13)
Problems are KxNxRxDIR (bf16, M = 8192, the layer's layouts; fwd y = x W^T + (x A^T)(s B)^T, bwd dx = dy W +
(dy B)(s A)).  For each: the median GPU time of rotated CUDA-graph rounds of `proj`, `gemm` (pm given) and every
variant, then one eager run's timeline per variant.  Writes $OUT/proj_timeline.json; table last.
(At 61986cc the same script timed the projection loop unrolled instead: results/proj_timeline_h200_2026-12-01_61986cc.json.)
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

TIMES_AT = 8192  # int32 slot of the lock buffer where the timestamps start (past any M's flags)
FIELDS = 8  # int32 slots per program: start, projection start, projection end, end, SM id
TIMERS = (
    ("import triton.language as tl\n",
     "import triton.language as tl\nfrom triton.language.extra.cuda import globaltimer, smid\n"),
    ("    # GEMM tiles are handed out from the last program down",
     "    t_start = globaltimer()\n    # GEMM tiles are handed out from the last program down"),
    ("    if FUSE_PROJ:\n        rr = tl.arange(0, BR)\n",
     "    t_p0 = globaltimer()\n    if FUSE_PROJ:\n        rr = tl.arange(0, BR)\n"),
    ("\n    _tma_gemm_tiles(\n", "\n    t_p1 = globaltimer()\n    _tma_gemm_tiles(\n"),
    ("    if FUSE_PROJ:  # the last program done zeroes the locks",
     f"""    if FUSE_PROJ:
        t_end = globaltimer()
        tb = flag_ptr + {TIMES_AT} + tl.program_id(0) * {FIELDS}
        tl.store(tb, t_start.to(tl.int32))
        tl.store(tb + 1, t_p0.to(tl.int32))
        tl.store(tb + 2, t_p1.to(tl.int32))
        tl.store(tb + 3, t_end.to(tl.int32))
        tl.store(tb + 4, smid())
    if FUSE_PROJ:  # the last program done zeroes the locks"""),
    # room for the timestamps in the lock buffer, eager and under graph capture
    ("torch.zeros(max(n, 1), dtype=torch.int32", "torch.zeros(max(n, 1 << 16), dtype=torch.int32"),
    ("torch.zeros(max(n, 1024), dtype=torch.int32", "torch.zeros(max(n, 1 << 16), dtype=torch.int32"),
)
LEAD = "_PROJ_LEAD = tl.constexpr(1)"
VARIANTS = {
    "lead1": (),  # the library's kernel
    "lead0": ((LEAD, "_PROJ_LEAD = tl.constexpr(0)"),),
    "lead2": ((LEAD, "_PROJ_LEAD = tl.constexpr(2)"),),
    # every projection before the program's GEMM tiles (the schedule before Version 13)
    "front": (("split = first_tile + tl.maximum(t_need // NUM_SMS - _PROJ_LEAD, 0) * NUM_SMS", "split = first_tile"),),
}


def timeline(mod, fn, n_prog: int, n_short: int) -> dict:
    """One eager run's per-program (start, projection start, projection end, end) in us from the first start,
    and a summary: the short programs' projection phase and end, the other programs' end."""
    fn()
    torch.cuda.synchronize()
    buf = next(b for b in mod._LOCKS.values() if b.numel() >= TIMES_AT + FIELDS * n_prog)
    raw = buf[TIMES_AT:TIMES_AT + FIELDS * n_prog].view(n_prog, FIELDS).cpu().to(torch.int64)
    t = raw[:, :4] & 0xFFFFFFFF
    rel = ((t - t[:, 0].min()) % (1 << 32)).double() / 1e3  # us
    proj = (rel[:n_short, 2] - rel[:n_short, 1]).tolist()
    short_end, long_end = rel[:n_short, 3].tolist(), rel[n_short:, 3].tolist()

    def med(v):
        return statistics.median(v) if v else float("nan")
    return dict(span=rel[:, 3].max().item(), start_skew=rel[:, 0].max().item(),
                short_proj_med=med(proj), short_proj_max=max(proj, default=float("nan")),
                short_end_med=med(short_end), short_end_max=max(short_end, default=float("nan")),
                long_end_med=med(long_end), long_end_max=max(long_end, default=float("nan")),
                per_program=rel.tolist(), smid=raw[:, 4].tolist())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", default="4096x4096x64xfwd,4096x4096x64xbwd,4096x4096x16xfwd,4096x4096x16xbwd,"
                    "4096x14336x64xfwd,4096x14336x64xbwd,14336x4096x64xfwd")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    mods = {n: patched_copy(T.__file__, f"t_{n}", *TIMERS, *VARIANTS[n]) for n in args.variants.split(",")}
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for spec in args.problems.split(","):
        K, N, r, direction = spec.split("x")
        K, N, r = int(K), int(N), int(r)
        a, b, rop, q = problem(direction, K, N, r)
        pm = T.proj(a, rop)
        force(T, a, b, pm, q, r)
        ref = T.gemm_lora(a, b, pm, q, 2.0, tma=True).float()
        fns = {"proj": lambda: T.proj(a, rop), "gemm": lambda: T.gemm_lora(a, b, pm, q, 2.0, tma=True)}
        errs = {}
        for name, mod in mods.items():
            force(mod, a, b, pm, q, r, rop)
            fns[name] = (lambda m: lambda: m.gemm_lora_proj(a, b, rop, q, 2.0))(mod)
            out, pm_v = fns[name]()
            errs[name] = dict(pm=((pm_v.float() - pm.float()).norm() / pm.float().norm()).item())
            errs[name]["out"] = ((out.float() - ref).norm() / ref.norm()).item()
        times = rotated_cudagraph_us(fns, args.rounds, rep=100)
        tiles = (8192 // 128) * -(-N // 256)
        n_prog = min(n_sm, tiles)
        n_short = n_prog - tiles % n_prog
        lines = {name: timeline(mod, fns[name], n_prog, n_short) for name, mod in mods.items()}
        row = dict(K=K, N=N, r=r, dir=direction, n_prog=n_prog, n_short=n_short, rel_err=errs,
                   us={n: statistics.median(v) for n, v in times.items()}, timeline=lines)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "timeline"}, flush=True)
        for name, tl_ in lines.items():
            print(name, {k: round(v, 1) for k, v in tl_.items() if isinstance(v, float)}, flush=True)
    print("wrote", write_json("proj_timeline.json", dict(env=run_env(), rows=rows)))
    print("\nGPU time (CUDA graphs), us")
    cols = ["proj", "gemm", *mods]
    print("| K, N | r | dir | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 3) + "|")
    for row in rows:
        print(f"| {row['K']}, {row['N']} | {row['r']} | {row['dir']} | "
              + " | ".join(f"{row['us'][c]:.1f}" for c in cols) + " |")
    print("\nTimeline of one eager run, us from the first program's start: short programs' projection phase "
          "(median / max), their end (median / max), the other programs' end (median / max)")
    print("| K, N | r | dir | variant | short: proj | short: end | long: end | span |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for name, t in row["timeline"].items():
            print(f"| {row['K']}, {row['N']} | {row['r']} | {row['dir']} | {name} | "
                  f"{t['short_proj_med']:.1f} / {t['short_proj_max']:.1f} | {t['short_end_med']:.1f} / "
                  f"{t['short_end_max']:.1f} | {t['long_end_med']:.1f} / {t['long_end_max']:.1f} | {t['span']:.1f} |")


if __name__ == "__main__":
    main()
