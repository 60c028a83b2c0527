"""Host time of a LoRA layer's pieces at real shapes, measured while a sleep kernel keeps the GPU busy.

    python benchmarks/host_issue.py [--shape 4096x4096] [--ranks 16,64] [--M 8192] [--out host_issue.json]

Each row issues ``n`` calls behind a long ``torch.cuda._sleep``, so the host never waits for the GPU and
the wall time of issuing them is host time only (``host_costs.py`` does the same at tiny shapes,
where the GPU is idle anyway). A row is flagged when the sleep ended before the last call was
issued (its figure is then a lower bound of GPU time, not host time). Rows: one ``torch.mm`` (the
unit of this CPU's speed), each launcher of the kernel path at the layer's shapes, whole fwd+bwd
steps (frozen, kernel path; an NF4 base when bitsandbytes is installed) and an NF4 dequantize alone
(bitsandbytes' ``dequantize_4bit`` and automodel_lora's kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from automodel_lora import patch_linear_module  # noqa: E402
from automodel_lora.kernels import nf4 as NF4  # noqa: E402
from automodel_lora.kernels import triton_lora as T  # noqa: E402

SLEEP_CYCLES = 400_000_000  # ~0.2 s at H100 clocks: longer than any row's issue time


def issue_us(fn, n: int = 20) -> tuple[float, bool]:
    """(host us per call of ``fn``, whether the GPU stayed busy throughout)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    busy_until = torch.cuda.Event()
    torch.cuda._sleep(SLEEP_CYCLES)
    busy_until.record()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t) / n * 1e6
    valid = not busy_until.query()
    torch.cuda.synchronize()
    return us, valid


def step_fn(layer, x, dy):
    """One fwd+bwd step of ``layer`` (x.grad cleared first, so no accumulation kernel runs)."""
    def step():
        x.grad = None
        layer(x).backward(dy)
    return step


def rank_rows(M: int, K: int, N: int, r: int) -> dict:
    dt, dev = torch.bfloat16, "cuda"
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dt)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    A = torch.randn(r, K, device=dev, dtype=dt) / K**0.5
    B = torch.randn(N, r, device=dev, dtype=dt) * 0.05
    xa, dyb = T.proj(x, A.t()), T.proj(dy, B)
    rows = {
        "proj x A^T": issue_us(lambda: T.proj(x, A.t())),
        "proj dy B": issue_us(lambda: T.proj(dy, B)),
        "tn2 (dA, dB)": issue_us(lambda: T.tn2(dyb, x, xa, dy, 2.0)),
    }
    if T.tma_eligible(x, W.t(), xa, B.t()):
        rows["gemm_lora fwd (TMA)"] = issue_us(lambda: T.gemm_lora(x, W.t(), xa, B.t(), 2.0, tma=True))
        rows["gemm_lora bwd (TMA)"] = issue_us(lambda: T.gemm_lora(dy, W, dyb, A, 2.0, tma=True))
    layer = nn.Linear(K, N, bias=False, device=dev, dtype=dt).requires_grad_(False)
    patch_linear_module(layer, dim=r, alpha=2 * r)
    xg = x.clone().requires_grad_(True)
    rows["step, kernel path"] = issue_us(step_fn(layer, xg, dy))
    nf4 = _nf4_layer(K, N, r)
    if nf4 is not None:
        rows["step, kernel path, NF4 base"] = issue_us(step_fn(nf4, xg, dy))
    return rows


def _nf4_layer(K: int, N: int, r: int | None):
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    q = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(torch.randn(N, K, dtype=torch.bfloat16) / K**0.5, requires_grad=False,
                                 quant_type="nf4")
    q = q.cuda()
    if r is not None:
        patch_linear_module(q, dim=r, alpha=2 * r)
    return q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x4096", help="K x N")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    K, N = (int(v) for v in args.shape.split("x"))
    M = args.M
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    W = torch.randn(N, K, device=dev, dtype=dt)
    lin = nn.Linear(K, N, bias=False, device=dev, dtype=dt).requires_grad_(False)
    common = {
        "torch.mm": issue_us(lambda: torch.mm(x.detach(), W.t())),
        "step, frozen": issue_us(step_fn(lin, x, dy)),
    }
    nf4 = _nf4_layer(K, N, None)
    if nf4 is not None:
        import bitsandbytes as bnb

        w = nf4.weight
        common["bnb dequantize_4bit"] = issue_us(lambda: bnb.functional.dequantize_4bit(w.data, w.quant_state))
        common["automodel_lora dequantize_nf4"] = issue_us(lambda: NF4.dequantize_nf4(w.data, w.quant_state, dt))
        common["step, frozen NF4"] = issue_us(step_fn(nf4, x, dy))
    ranks = [int(v) for v in args.ranks.split(",")]
    per_rank = {r: rank_rows(M, K, N, r) for r in ranks}

    print(f"{torch.cuda.get_device_name()}, M={M}, K={K}, N={N}; host us per call, GPU held busy "
          "(* = the GPU went idle: not host-bound there)")
    for name, (us, ok) in common.items():
        print(f"| {name:32s} | {us:8.1f}{'' if ok else '*'} |")
    print("| call | " + " | ".join(f"r={r}" for r in ranks) + " |")
    for name in per_rank[ranks[0]]:
        cells = [f"{per_rank[r][name][0]:8.1f}{'' if per_rank[r][name][1] else '*'}" for r in ranks]
        print(f"| {name:32s} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("GIT_COMMIT", ""),
                       "M": M, "K": K, "N": N, "us_per_call": {k: v[0] for k, v in common.items()},
                       "us_per_call_by_rank": {r: {k: v[0] for k, v in rows.items()} for r, rows in per_rank.items()},
                       "gpu_stayed_busy": all(v[1] for v in common.values())
                       and all(v[1] for rows in per_rank.values() for v in rows.values())}, f, indent=1)


if __name__ == "__main__":
    main()
