"""Where the programs of the fused TMA GEMM (FUSE_PROJ) spend their time: per-program timestamps, and GPU time.

    python benchmarks/proj_timeline.py [--rounds 3] [--problems 4096x4096x64xfwd,...] [--variants fused,noproj,...]

Every variant is a patched copy of triton_lora.py whose TMA GEMM kernel writes, per program, %globaltimer when it
starts, when its projection tiles are done and when it ends (into its lock buffer, past the flags), run with one
forced config (BM128 BN256 BK64, 3 stages, 8 warps, GROUP_M 8, split store at r=64):
  fused            the library's kernel
  u2s3, u2s4, u4s2 the projection tiles' loop unrolled: 2 or 4 x tiles per iteration, 3 / 4 / 2 stages of them
  projonly         fused without its GEMM tiles: the projection tiles alone on the short programs (pm only)
  projonly_u4s2    the same, unrolled as u4s2
  m2               fused, a program's two projection tiles in one pass over K (Rop's tile read once for both)
  nowait           fused without the GEMM tiles' flag checks (timing only: may read P early)
  noproj           fused without projection tiles or flag checks: the fused kernel's GEMM tiles alone (timing only)
Problems are KxNxRxDIR (bf16, M = 8192, the layer's layouts; fwd y = x W^T + (x A^T)(s B)^T, bwd dx = dy W +
(dy B)(s A)).  For each: the median GPU time of rotated CUDA-graph rounds of `proj`, `gemm` (pm given) and
every variant, then per variant the timeline of one eager run and of the last of 20 replays of a CUDA graph.
Writes $OUT/proj_timeline.json; table last.
The schedule that spread the projections between GEMM tiles (55427863, reverted) was timed by that commit's
version of this script: results/proj_timeline_h200_2026-12-01_schedule_55427863.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import patched_copy, rotated_cudagraph_us, run_env, write_json  # noqa: E402
from fuse_proj_probe import PATCHES, force, problem  # noqa: E402

from automodel_lora.kernels import triton_lora as T  # noqa: E402

TIMES_AT = 8192  # int32 slot of the lock buffer where the timestamps start (past any M's flags)
TIMERS = (
    ("import triton.language as tl\n",
     "import triton.language as tl\nfrom triton.language.extra.cuda import globaltimer, smid\n"),
    ("    # GEMM tiles are handed out from the last program down",
     "    t_start = globaltimer()\n    # GEMM tiles are handed out from the last program down"),
    ("    all_ready = False  # FUSE_PROJ", "    t_proj = globaltimer()\n    all_ready = False  # FUSE_PROJ"),
    ("    if FUSE_PROJ:  # the last program done zeroes the locks",
     f"""    if FUSE_PROJ:
        t_end = globaltimer()
        tb = flag_ptr + {TIMES_AT} + tl.program_id(0) * 4
        tl.store(tb, t_start.to(tl.int32))
        tl.store(tb + 1, t_proj.to(tl.int32))
        tl.store(tb + 2, t_end.to(tl.int32))
        tl.store(tb + 3, smid())
    if FUSE_PROJ:  # the last program done zeroes the locks"""),
    # room for the timestamps in the lock buffer, eager and under graph capture
    ("        return torch.zeros(max(n, 1), dtype=torch.int32, device=device)\n",
     "        _CAPTURED.append(torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device))\n"
     "        return _CAPTURED[-1]\n"),
    ("_LOCKS: dict = {}\n", "_LOCKS: dict = {}\n_CAPTURED: list = []  # the lock buffers made under graph capture\n"),
    ("torch.zeros(max(n, 1024), dtype=torch.int32", "torch.zeros(max(n, 1 << 16), dtype=torch.int32"),
)
_SRC = open(T.__file__).read()


def _between(start: str, end: str) -> str:
    """The library kernel's text from ``start`` up to ``end``: the ``old`` side of a patch, read, not copied."""
    i = _SRC.index(start)
    return _SRC[i:_SRC.index(end, i)]


# a projection tile's loop over K, and the whole projection tile of the library's kernel
PROJ_LOOP = _between("                for ki in tl.range(0, k_tiles, num_stages=STAGES * (3 - R_BYTES // 2)):\n",
                     "                rm = off_m + tl.arange(0, BM)\n")
PROJ_TILE = _between("            for pid_m in tl.range(tl.program_id(0), num_m, n_short):\n",
                     "    all_ready = False  # FUSE_PROJ")
# two row blocks of a program (m and m + n_short) in one pass over K: Rop's tile is read once for both
PROJ_TILE_M2 = """            for pid_m in tl.range(tl.program_id(0), num_m, 2 * n_short):
                pid_m2 = pid_m + n_short  # past num_m: its loads zero-fill, its store is masked, no flag
                pacc = tl.zeros((BM, BR), dtype=tl.float32)
                pacc2 = tl.zeros((BM, BR), dtype=tl.float32)
                for ki in tl.range(0, k_tiles, num_stages=5):
                    a = a_desc.load([pid_m * BM, ki * BK])
                    a2 = a_desc.load([pid_m2 * BM, ki * BK])
                    if R_T:
                        rt = r_desc.load([0, ki * BK]).T
                    else:
                        rt = r_desc.load([ki * BK, 0])
                    pacc = tl.dot(a, rt.to(a.dtype), pacc)
                    pacc2 = tl.dot(a2, rt.to(a.dtype), pacc2)
                rm = pid_m * BM + tl.arange(0, BM)
                tl.store(pm_ptr + rm.to(tl.int64)[:, None] * spm + rr[None, :], pacc.to(c_desc.dtype),
                         mask=(rm < M)[:, None] & (rr < R)[None, :])
                rm2 = pid_m2 * BM + tl.arange(0, BM)
                tl.store(pm_ptr + rm2.to(tl.int64)[:, None] * spm + rr[None, :], pacc2.to(c_desc.dtype),
                         mask=(rm2 < M)[:, None] & (rr < R)[None, :])
                tl.debug_barrier()  # every thread's rows of P are written before the releases below
                tl.atomic_xchg(flag_ptr + pid_m, 1, sem="release", scope="gpu")
                tl.atomic_add(flag_ptr + num_m, 1, sem="release", scope="gpu")
                if pid_m2 < num_m:
                    tl.atomic_xchg(flag_ptr + pid_m2, 1, sem="release", scope="gpu")
                    tl.atomic_add(flag_ptr + num_m, 1, sem="release", scope="gpu")
"""
NO_GEMM_TILES = ("    for tile in tl.range(first_tile, num_tiles, NUM_SMS, flatten=True):",
                 "    for tile in tl.range(first_tile, 0, NUM_SMS, flatten=True):")


def unrolled(u: int, stages: int) -> tuple[str, str]:
    """The projection loop with ``u`` x tiles per iteration (tiles past K load as zeros: any k_tiles works)."""
    lines = [f"                for ki in tl.range(0, k_tiles, {u}, num_stages={stages}):"]
    for j in range(u):
        lines += [f"                    a{j} = a_desc.load([off_m, (ki + {j}) * BK])",
                  "                    if R_T:",
                  f"                        rt{j} = r_desc.load([0, (ki + {j}) * BK]).T",
                  "                    else:",
                  f"                        rt{j} = r_desc.load([(ki + {j}) * BK, 0])"]
    lines += [f"                    pacc = tl.dot(a{j}, rt{j}.to(a{j}.dtype), pacc)" for j in range(u)]
    return PROJ_LOOP, "\n".join(lines) + "\n"


NO_WAITS = PATCHES["fused_nowait"]  # the GEMM tiles' flag checks removed
NO_PROJ_TILES = ("        if tl.program_id(0) < n_short:\n", "        if tl.program_id(0) < 0:\n")
VARIANTS = {
    "fused": (),
    "u2s3": (unrolled(2, 3),),
    "u2s4": (unrolled(2, 4),),
    "u4s2": (unrolled(4, 2),),
    "projonly": (NO_GEMM_TILES,),
    "projonly_u4s2": (unrolled(4, 2), NO_GEMM_TILES),
    "m2": ((PROJ_TILE, PROJ_TILE_M2),),
    "nowait": (NO_WAITS,),
    "noproj": (NO_PROJ_TILES, NO_WAITS),
}
EXACT = ("fused", "u2s3", "u2s4", "u4s2", "m2")  # the variants whose output is the product


def timeline(mod, fn, n_prog: int, n_short: int, graph: bool) -> dict:
    """Per-program (start, projection done, end) in us from the first start, and a summary: of one eager run, or
    (graph) of the last of 20 back-to-back replays of a CUDA graph of one launch (the steady state of the timing)."""
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(20):
            g.replay()
        torch.cuda.synchronize()
        buf = mod._CAPTURED[-1]
    else:
        fn()
        torch.cuda.synchronize()
        buf = next(b for b in mod._LOCKS.values() if b.numel() >= TIMES_AT + 4 * n_prog)
    raw = buf[TIMES_AT:TIMES_AT + 4 * n_prog].view(n_prog, 4).cpu().to(torch.int64)
    t = raw[:, :3] & 0xFFFFFFFF
    rel = ((t - t[:, 0].min()) % (1 << 32)).double() / 1e3  # us
    proj = (rel[:n_short, 1] - rel[:n_short, 0]).tolist()
    short_end, long_end = rel[:n_short, 2].tolist(), rel[n_short:, 2].tolist()

    def med(v):
        return statistics.median(v) if v else float("nan")
    return dict(span=rel[:, 2].max().item(), start_skew=rel[:, 0].max().item(),
                short_proj_med=med(proj), short_proj_max=max(proj, default=float("nan")),
                short_end_med=med(short_end), short_end_max=max(short_end, default=float("nan")),
                long_end_med=med(long_end), long_end_max=max(long_end, default=float("nan")),
                per_program=rel.tolist(), smid=raw[:, 3].tolist())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--problems", default="4096x4096x64xfwd,4096x4096x64xbwd,4096x4096x16xfwd,4096x14336x64xbwd")
    ap.add_argument("--variants", default="fused,m2,noproj")
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
            if name in EXACT:
                errs[name]["out"] = ((out.float() - ref).norm() / ref.norm()).item()
        times = rotated_cudagraph_us(fns, args.rounds, rep=100)
        tiles = T._cdiv(a.shape[0], 128) * T._cdiv(N, 256)  # the forced config's tiles
        n_prog = min(n_sm, tiles)
        n_short = n_prog - tiles % n_prog
        lines = {f"{name}, {mode}": timeline(mod, fns[name], n_prog, n_short, mode == "graph")
                 for name, mod in mods.items() for mode in ("eager", "graph")}
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
    print("\nTimeline of one eager run or of a graph's last replay, us from the first program's start: short "
          "programs' projection phase (median / max), their end (median / max), the other programs' end (median / max)")
    print("| K, N | r | dir | variant | short: proj | short: end | long: end | span |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        for name, t in row["timeline"].items():
            print(f"| {row['K']}, {row['N']} | {row['r']} | {row['dir']} | {name} | "
                  f"{t['short_proj_med']:.1f} / {t['short_proj_max']:.1f} | {t['short_end_med']:.1f} / "
                  f"{t['short_end_max']:.1f} | {t['long_end_med']:.1f} / {t['long_end_max']:.1f} | {t['span']:.1f} |")


if __name__ == "__main__":
    main()
