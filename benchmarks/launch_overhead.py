"""Host time of one kernel launch: Triton's jit launch vs the cached direct launch.

    python benchmarks/launch_overhead.py
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from automodel_lora.kernels import triton_lora as T  # noqa: E402


def per_call_us(fn, n=2000):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(256, 16, device="cuda", dtype=torch.bfloat16)
    rows = {"torch.mm": per_call_us(lambda: torch.mm(x, a)),
            "torch.empty": per_call_us(lambda: torch.empty(64, 16, device="cuda", dtype=torch.bfloat16))}
    for fast in (False, True):
        T._FAST_LAUNCH = fast and T.knobs is not None
        rows[f"proj fast={fast}"] = per_call_us(lambda: T.proj(x, a))
    print(f"knobs: {T.knobs is not None}; compiled entries: {len(T._COMPILED)}")
    for k, v in rows.items():
        print(f"{k:24s} {v:7.1f} us")


if __name__ == "__main__":
    main()
