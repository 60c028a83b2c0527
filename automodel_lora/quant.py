"""Glue for quantized bases (bitsandbytes 4-bit): detection and the adapter dtype they imply.

bitsandbytes is optional; nothing here imports it unless the weight looks quantized.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


def is_quantized_linear(module: nn.Linear) -> bool:
    """True when the base weight is stored quantized (bitsandbytes `Params4bit`, int8, ...), not as floats."""
    weight = module.weight
    return (
        getattr(weight, "quant_state", None) is not None
        or type(weight).__name__ == "Params4bit"
        or (not weight.dtype.is_floating_point)
    )


def quantized_compute_dtype(module: nn.Linear) -> torch.dtype:
    """Default adapter dtype for a quantized base: its compute dtype if it is a float type, else bf16."""
    compute_dtype = getattr(module, "compute_dtype", None)
    if isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point:
        return compute_dtype
    return torch.bfloat16


# bitsandbytes itself computes a 4-bit layer's product as dequantize + F.linear on CUDA from this many
# rows on (below, its own 4-bit GEMM kernel may be faster: bitsandbytes/backends/cuda/ops.py, 0.50).
# Other accelerators use the same bound here; on the CPU bitsandbytes always dequantizes.
_BNB_DEQUANT_MIN_ROWS = 1537


def dequantizer_4bit(module: nn.Linear, base_cls: type, x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """How the LoRA kernels can run ``module``'s bitsandbytes 4-bit product themselves, or None.

    Returns a callable giving the base weight dequantized to ``(out_features, in_features)``, straight
    into x's dtype: what bitsandbytes' own 4-bit matmul multiplies by (it dequantizes once in forward
    and once in backward). The packed weight and its quant state are taken now, so a backward sees
    what its forward saw. None, so the module's own forward runs, unless all of these hold: the
    class's product is ``bnb.nn.Linear4bit.forward`` itself; the weight is quantized in the (out, in)
    orientation with its quant state attached (not repacked for CPU inference); the module's compute
    dtype is x's dtype (bitsandbytes sets it on its first call); the base is frozen; and, off the
    CPU, x has enough rows that bitsandbytes would dequantize too.
    """
    weight = module.weight
    if type(weight).__name__ != "Params4bit" or weight.requires_grad:
        return None
    import bitsandbytes as bnb  # the weight is one of its Params4bit: it is installed

    quant_state = getattr(weight, "quant_state", None)
    if (
        base_cls.forward is not bnb.nn.Linear4bit.forward
        or quant_state is None
        or getattr(quant_state, "packing_format_for_cpu", False)
        or tuple(quant_state.shape) != (module.out_features, module.in_features)
        or getattr(module, "compute_dtype", None) != x.dtype
        or (module.bias is not None and module.bias.requires_grad)
    ):
        return None
    if x.device.type != "cpu" and x.numel() // max(x.shape[-1], 1) < _BNB_DEQUANT_MIN_ROWS:
        return None
    packed = weight.data
    dtype = x.dtype  # dequantize into x's dtype directly (one rounding, as bitsandbytes' matmul)
    state = _snapshot(quant_state)  # Params4bit.to() moves the module's quant state in place
    from .kernels import backend as kernels  # here, not at import: it may load triton

    if kernels.use_kernels_for(x):
        from .kernels import nf4

        if nf4.nf4_supported(state, packed):

            def dequantize_kernel() -> torch.Tensor:  # (out_features, in_features), one Triton launch
                return kernels.on_device_of(packed, nf4.dequantize_nf4, packed, state, dtype)

            return dequantize_kernel
    state.dtype = dtype

    def dequantize() -> torch.Tensor:  # (out_features, in_features)
        return bnb.functional.dequantize_4bit(packed, state)

    return dequantize


def _snapshot(quant_state):
    """A shallow copy of a bitsandbytes ``QuantState`` and of its nested state: the tensors it holds now,
    whatever later moves or replaces them in the original (``QuantState.to`` reassigns them in place)."""
    state = copy.copy(quant_state)
    if getattr(quant_state, "state2", None) is not None:
        state.state2 = copy.copy(quant_state.state2)
    return state
