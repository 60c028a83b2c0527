"""Where one training step's time goes: device time per kind of kernel, and the wall time beside it.

``StepProfile(start, steps)`` is ticked at the end of every optimizer step (``tick()``); it profiles steps
``start .. start + steps - 1`` with ``torch.profiler`` (device kernels only) and ``result()`` gives, per step:

- ``wall_ms``: wall time of a profiled step (the device synchronized at each step end, as both arms of
  ``bench_real_size.py`` do);
- ``kernel_ms``: the sum of the device's kernel times (``wall_ms - kernel_ms`` bounds the time the device
  sat idle: host gaps, synchronizations, copies);
- ``by_kind``: ``kernel_ms`` split by kernel name into the kinds of ``KINDS`` (first match wins;
  ``other`` is what none matched: mostly PyTorch's elementwise and reduction kernels);
- ``top``: the ``TOP`` kernels by device time, with their calls per step.

The kinds come from kernel names, so they are a reading aid, not a measurement of a module: a cuBLAS GEMM
is ``gemm`` whether it ran in an adapted linear or in the LM head.
"""

from __future__ import annotations

import re
import time

import torch

KINDS = (  # (kind, regex over the kernel name), first match wins
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("loss", r"cross_entropy|log_softmax|softmax_backward|nll_loss|logsumexp|liger|flce"),
    ("norm", r"rms|layer_norm|norm_kernel"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("quant", r"dequant|nf4|kdequantize|bnb|4bit"),
    # this library's Triton kernels (`_<name>_kernel`: the LoRA GEMM, proj, expand, tn2, segmented, gather,
    # DoRA, embedding, gated product); Liger's were matched above
    ("ours", r"^_\w+_kernel$"),
    ("inductor", r"^triton_"),  # torch.compile's generated kernels
    ("gemm", r"gemm|nvjet|cutlass|xmma|sm90_|cublas|matmul|_mm_|splitk"),
    ("copy_cast", r"copy|cast|convert|fill|memcpy|memset|cat_|to_copy"),
)
TOP = 20


def kind_of(name: str) -> str:
    """The first ``KINDS`` entry whose regex matches ``name`` (case-insensitive), else ``other``."""
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


class StepProfile:
    """Profiles steps ``start .. start + steps - 1`` (0-based) of a training loop ticked at each step end."""

    def __init__(self, start: int, steps: int = 2):
        if start < 1 or steps < 1:
            raise ValueError(f"StepProfile needs start >= 1 and steps >= 1, got start={start}, steps={steps}")
        self.start, self.steps, self.seen = start, steps, 0
        self.prof, self.t0, self.wall = None, None, None
        self.cuda = torch.cuda.is_available()  # off CUDA (the smoke test) the CPU's operator times stand in

    def tick(self) -> None:
        """Call at the end of every step, after the device is synchronized."""
        self.seen += 1
        if self.seen == self.start:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CUDA if self.cuda else ProfilerActivity.CPU])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.seen == self.start + self.steps and self.prof is not None:
            if self.cuda:
                torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)

    def result(self) -> dict | None:
        """Per-step figures of the profiled steps (see the module docstring); None if they never ran."""
        if self.wall is None:
            return None
        kernels: dict[str, list] = {}  # name -> [device us, calls]
        want = torch.autograd.DeviceType.CUDA if self.cuda else torch.autograd.DeviceType.CPU
        for e in self.prof.events():
            us = (getattr(e, "device_time", 0.0) if self.cuda else e.self_cpu_time_total) or 0.0
            if us > 0 and e.device_type == want:
                entry = kernels.setdefault(e.name, [0.0, 0])
                entry[0] += us
                entry[1] += 1
        by_kind: dict[str, float] = {}
        for name, (us, _) in kernels.items():
            by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us / 1e3 / self.steps
        top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:TOP]
        return {
            "steps": self.steps, "wall_ms": self.wall * 1e3 / self.steps,
            "kernel_ms": sum(by_kind.values()),
            "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:120], "kind": kind_of(n), "ms": us / 1e3 / self.steps, "calls": c / self.steps}
                    for n, (us, c) in top],
        }


def print_profile(label: str, p: dict | None) -> None:
    """The profile's per-kind split and its top kernels, as text."""
    if not p:
        print(f"[profile] {label}: no profiled steps")
        return
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in p["by_kind"].items())
    print(f"[profile] {label}: wall {p['wall_ms']:.1f} ms/step, kernels {p['kernel_ms']:.1f} ms ({kinds})")
    for t in p["top"]:
        print(f"    {t['ms']:8.2f} ms {t['calls']:6.0f}x  {t['kind']:<11} {t['name']}")
