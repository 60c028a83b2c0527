"""The bandwidth-bound LoRA kernels (`proj`, `tn2`) forced to each config, with their read rate (GPU time).

    python benchmarks/skinny_configs.py [--shapes 4096x4096,4096x14336,14336x4096] [--ranks 16,64]

Problems (bf16, M = 8192), as the layer runs them:
  proj_x:  xa  = x @ A^T         reads x  (M K 2 bytes)
  proj_dy: dyB = dy @ B          reads dy (M N 2 bytes)
  tn2:     dA = s dyB^T x, dB = s dy^T xa   reads x and dy
Each kernel is checked against an fp32 reference, then timed from a CUDA graph (do_bench_cudagraph,
median) for every config of its autotune set plus a few with more programs, in rounds that visit the
variants in a rotating order, with `read` (torch's sum over the same inputs, which reads them once)
in the same rounds as a yardstick; it reads at only ~2.9 TB/s on an H200, so compare TB/s with the
~4.3 TB/s copy rate instead (benchmarks/NOTES.md). Also reports which config the library's
autotuner picks. Writes $OUT/skinny_configs.json (OUT defaults to "."); table last.
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

# more programs than the autotune sets offer (M = 8192: BM = 16 is 512 programs per rank block)
EXTRA_PROJ = [(dict(BM=16, BK=256), 4, 4), (dict(BM=32, BK=128), 4, 6), (dict(BM=16, BK=512), 4, 3)]
EXTRA_TN = [(dict(BM=64, BD=64), 4, 6), (dict(BM=32, BD=128), 4, 5)]


def plans(tuned, extra):
    out = [(dict(c.kwargs), c.num_warps, c.num_stages) for c in tuned.configs]
    return out + [p for p in extra if p not in out]


def plan_name(plan) -> str:
    kw, w, s = plan
    return "/".join(f"{k}{v}" for k, v in kw.items()) + f"/w{w}/s{s}"


def force(name, key, plan) -> None:
    T._PLANS[(name, key)] = plan
    T._COMPILED.clear()


def rel_err(a, ref) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    M, s, dt, dev = 8192, 2.0, torch.bfloat16, "cuda"
    rows = []
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        for r in (int(v) for v in args.ranks.split(",")):
            torch.manual_seed(0)
            x = torch.randn(M, K, device=dev, dtype=dt)
            dy = torch.randn(M, N, device=dev, dtype=dt)
            A = torch.randn(r, K, device=dev, dtype=dt) / K**0.5
            B = torch.randn(N, r, device=dev, dtype=dt) * 0.05
            xa, dyB = T.proj(x, A.t()), T.proj(dy, B)
            problems = {
                "proj_x": (("proj", (T._m_bucket(M), K, r, False, dt)), plans(T._proj_tuned, EXTRA_PROJ),
                           lambda: T.proj(x, A.t()), x.float() @ A.float().t(), M * K * 2, x),
                "proj_dy": (("proj", (T._m_bucket(M), N, r, False, dt)), plans(T._proj_tuned, EXTRA_PROJ),
                            lambda: T.proj(dy, B), dy.float() @ B.float(), M * N * 2, dy),
                "tn2": (("tn2", (T._m_bucket(M), K, N, r, False, False, dt)), plans(T._tn2_tuned, EXTRA_TN),
                        lambda: T.tn2(dyB, x, xa, dy, s, dtype_a=dt, dtype_b=dt)[0],
                        s * dyB.float().t() @ x.float(), (M * K + M * N) * 2, None),
            }
            for prob, (pkey, cands, run, ref, nbytes, src) in problems.items():
                T._PLANS.pop(pkey, None)
                T._COMPILED.clear()
                run()  # the autotuner's own pick
                picked = T._PLANS.get(pkey)
                variants, errs = {}, {}
                for plan in cands:
                    force(*pkey, plan)
                    try:
                        got = run()
                        torch.cuda.synchronize()
                    except Exception as e:  # a config that does not compile or fit is reported, not timed
                        print(f"{prob} {K}x{N} r={r} {plan_name(plan)}: {type(e).__name__}: {str(e)[:100]}")
                        continue
                    errs[plan_name(plan)] = rel_err(got, ref)
                    variants[plan_name(plan)] = (lambda pkey=pkey, plan=plan: (force(*pkey, plan), run()))
                reads = (src,) if src is not None else (x, dy)
                variants["read"] = lambda: [t.sum(dtype=torch.float32) for t in reads]
                names = list(variants)
                times = rotated_cudagraph_us(variants, args.rounds, rep=20)
                floor = statistics.median(times["read"])
                for n in names:
                    us = statistics.median(times[n])
                    rows.append(dict(problem=prob, K=K, N=N, r=r, config=n, us=us, tb_s=nbytes / us / 1e6,
                                     vs_read=us / floor, picked=(picked is not None and n == plan_name(picked)),
                                     err=errs.get(n)))
                best = min((d for d in rows[-len(names):] if d["config"] != "read"), key=lambda d: d["us"])
                pick = next((d for d in rows[-len(names):] if d["picked"]), None)
                print(f"[{prob} {K}x{N} r={r}] read {floor:.1f} us; best {best['config']} {best['us']:.1f} us; "
                      f"autotuned {pick['config'] if pick else '?'} {pick['us'] if pick else float('nan'):.1f} us",
                      flush=True)
            x = dy = A = B = xa = dyB = None
            torch.cuda.empty_cache()
    env = run_env()
    path = write_json("skinny_configs.json", dict(env=env, rows=rows))
    print(f"wrote {path}\n{env}")
    print("| problem | K, N | r | config | us | TB/s | vs read | autotuned | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in rows:
        err = "-" if d["err"] is None else f"{d['err']:.1e}"
        print(f"| {d['problem']} | {d['K']}, {d['N']} | {d['r']} | {d['config']} | {d['us']:.1f} | {d['tb_s']:.2f} | "
              f"{d['vs_read']:.2f} | {'*' if d['picked'] else ''} | {err} |")


if __name__ == "__main__":
    main()
