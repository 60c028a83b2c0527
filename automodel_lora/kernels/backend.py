"""Which backend the kernels run on, and what every kernel entry point shares.

``HAS_TRITON``: whether the Triton kernels import (triton is optional: without it the PyTorch reference
path of ``reference.py`` runs everywhere). ``use_kernels_for(t)``: whether they run for a tensor (CUDA, or
the CPU under ``TRITON_INTERPRET=1``, in fp32 / fp16 / bf16). ``on_device_of``: the device guard a
launch needs. The ``KernelOptions`` a call runs under (``None``: the environment's defaults, built once
per set of values) and the dropout keep-mask the active backend derives from a seed.
"""

from __future__ import annotations

import os
import warnings

import torch

from .options import KernelOptions
from .reference import reference_keep

__all__ = ["HAS_TRITON", "KERNEL_DTYPES", "use_kernels_for", "on_device_of", "dropout_keep_mask"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # triton is optional: without it the reference path runs everywhere
    from .dispatch import triton_backward, triton_forward
    from .dora_grad import dora_grad
    from .dora_norm import MAX_RANK as DORA_NORM_MAX_RANK
    from .dora_norm import dora_norm
    from .dropout import keep_mask

    HAS_TRITON = True
except ImportError as _e:  # pragma: no cover - depends on the environment
    triton_forward = triton_backward = keep_mask = dora_grad = dora_norm = None
    DORA_NORM_MAX_RANK = 0
    HAS_TRITON = False
    if torch.cuda.is_available():
        warnings.warn(f"Triton is not importable ({_e}); LoRA layers on CUDA run the slower PyTorch reference path",
                      stacklevel=2)

_ENV_DEFAULTS = ("AUTOMODEL_LORA_BASE_GEMM", "AUTOMODEL_LORA_FUSE_PROJ", "AUTOMODEL_LORA_FAST_LAUNCH")
_DEFAULT_OPTIONS: dict = {}


def _options(options: KernelOptions | None) -> KernelOptions:
    """``options``, or for None ``KernelOptions()`` (the environment's defaults), built once per set of values
    of those variables (building one per call would cost host time on every layer call)."""
    if options is not None:
        if not isinstance(options, KernelOptions):
            raise TypeError(f"options must be a KernelOptions (or None), got {type(options).__name__}; "
                            "build one with KernelOptions(...) or KernelOptions.from_dict(...)")
        return options
    env = os.environ
    key = tuple(env.get(name) for name in _ENV_DEFAULTS)
    opts = _DEFAULT_OPTIONS.get(key)
    if opts is None:
        opts = _DEFAULT_OPTIONS[key] = KernelOptions()
    return opts


_OP_OPTIONS: dict = {}


def _op_options(base_gemm: str, fuse_proj: bool, fast_launch: bool) -> KernelOptions:
    """The ``KernelOptions`` a custom op received as plain values (its schema takes no Python objects)."""
    key = (base_gemm, fuse_proj, fast_launch)
    opts = _OP_OPTIONS.get(key)
    if opts is None:
        opts = _OP_OPTIONS[key] = KernelOptions(base_gemm=base_gemm, fuse_proj=fuse_proj, fast_launch=fast_launch)
    return opts


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels compute in; others: reference


def use_kernels_for(t: torch.Tensor) -> bool:
    """True when the Triton kernels run for ``t``: on CUDA (or the CPU interpreter), in a dtype they compute in
    (float64 takes the PyTorch reference path everywhere)."""
    return HAS_TRITON and (t.is_cuda or (_INTERPRET and t.device.type == "cpu")) and t.dtype in KERNEL_DTYPES


def on_device_of(t: torch.Tensor, fn, *args):
    """``fn(*args)`` with ``t``'s GPU as the current device: Triton launches on the current device, so a
    layer on cuda:1 while cuda:0 is current needs the guard (entered only then: it costs host time)."""
    idx = t.get_device()
    if idx < 0 or idx == torch.cuda.current_device():
        return fn(*args)
    with torch.cuda.device(idx):
        return fn(*args)


# ----------------------------------------------------------------------------------------
# dropout keep-masks
# ----------------------------------------------------------------------------------------
def dropout_keep_mask(seed: torch.Tensor, M: int, D: int, p: float, device) -> torch.Tensor:
    """The ``(M, D)`` bool keep-mask the active backend derives from ``seed`` (tests, debugging)."""
    device = torch.device(device)
    if HAS_TRITON and (device.type == "cuda" or (_INTERPRET and device.type == "cpu")):
        seed = seed.to(device)
        return on_device_of(seed, keep_mask, seed, M, D, p, device)
    return reference_keep(seed, M, D, p, device)


