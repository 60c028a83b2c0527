"""Glue for quantized bases (bitsandbytes 4-bit): detection and the adapter dtype they imply.

bitsandbytes is optional; nothing here imports it unless the weight looks quantized.
"""

from __future__ import annotations

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
