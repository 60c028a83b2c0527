"""Host time of the pieces of a LoRA layer step, at tiny shapes (so each call's time is host time).

    python benchmarks/host_costs.py [--out host.json]

Rows: single torch ops (the unit of host cost on this CPU), one Triton launch through the jit
function and through the cached direct launch, each launcher of ``triton_lora`` (cuBLAS and TMA
base GEMM), and whole fwd+bwd steps of the frozen layer, the PyTorch path and the kernel path.
A step of the kernel path is host-bound wherever its row here exceeds its GPU time.
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
from automodel_lora.kernels import lora as K  # noqa: E402
from automodel_lora.kernels import triton_lora as T  # noqa: E402


def per_call_us(fn, n=2000):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def profile_step(step, gemm: str) -> None:
    """Print the functions with the most own host time over 300 steps under base GEMM ``gemm``."""
    import cProfile
    import pstats

    K.set_base_gemm(gemm)
    step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        step()
    torch.cuda.synchronize()
    prof.disable()
    print(f"--- cProfile of 300 steps, base GEMM {gemm} ---")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default="", help="base GEMM (cublas / triton) whose kernel-path step to cProfile")
    args = ap.parse_args()
    dt, dev = torch.bfloat16, "cuda"
    M, D, r = 64, 256, 16
    x = torch.randn(M, D, device=dev, dtype=dt)
    W = torch.randn(D, D, device=dev, dtype=dt)
    A = torch.randn(r, D, device=dev, dtype=dt)
    B = torch.randn(D, r, device=dev, dtype=dt)
    xa = T.proj(x, A.t())
    rows = {
        "torch.empty": per_call_us(lambda: torch.empty(M, r, device=dev, dtype=dt)),
        "torch.mm": per_call_us(lambda: torch.mm(x, W.t())),
        "x.t()": per_call_us(lambda: x.t()),
    }
    for fast in (False, True):
        T._FAST_LAUNCH = fast and T.knobs is not None
        rows[f"proj (fast launch={fast})"] = per_call_us(lambda: T.proj(x, A.t()))
    rows["expand"] = per_call_us(lambda: T.expand(xa, B.t(), 2.0))
    rows["tn2"] = per_call_us(lambda: T.tn2(xa, x, xa, x, 2.0))
    if T.tma_eligible(x, W.t(), xa, B.t()):
        descs = lambda: T.TensorDescriptor.from_tensor(x, [64, 64])  # noqa: E731
        rows["TensorDescriptor.from_tensor"] = per_call_us(descs)
        rows["gemm_lora (TMA)"] = per_call_us(lambda: T.gemm_lora(x, W.t(), xa, B.t(), 2.0, tma=True))

    lin = nn.Linear(D, D, bias=False, device=dev, dtype=dt).requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    g = torch.randn(M, D, device=dev, dtype=dt)
    mods = {"frozen": lin}
    for name, tri in (("torch", False), ("triton", True)):
        m = nn.Linear(D, D, bias=False, device=dev, dtype=dt).requires_grad_(False)
        patch_linear_module(m, dim=r, alpha=2 * r, use_triton=tri)
        mods[name] = m
    for name, m in mods.items():
        params = [p for p in m.parameters() if p.requires_grad]

        def step(m=m, params=params):
            xg.grad = None
            for p in params:
                p.grad = None
            m(xg).backward(g)
        for gemm in (("cublas", "triton") if name == "triton" else (None,)):
            if gemm:
                K.set_base_gemm(gemm)
            rows[f"step {name}" + (f" (base {gemm})" if gemm else "")] = per_call_us(step, n=500)
        if name == "triton" and args.profile:
            profile_step(step, args.profile)
        K.set_base_gemm("auto")
        rows[f"fwd no_grad {name}"] = per_call_us(lambda m=m: m(x), n=500)
    print(f"{torch.cuda.get_device_name()}; knobs: {T.knobs is not None}; compiled entries: {len(T._COMPILED)}")
    for k, v in rows.items():
        print(f"{k:36s} {v:8.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "commit": os.environ.get("GIT_COMMIT", ""),
                       "us_per_call": rows}, f, indent=1)


if __name__ == "__main__":
    main()
