"""``train.fused_norm: liger``: the model's RMSNorm modules run Liger-Kernel's RMSNorm kernel, swapped in place.

HF's RMSNorm is several PyTorch kernels in eager mode (the fp32 copy of the input, the mean of squares, the
reciprocal square root, two products and the cast back), each a pass over ``(tokens, hidden)``, and as many again
in its backward; with gradient checkpointing the forward runs twice. Liger's kernel is one pass forward and one
backward. Each matched module keeps its object, its name and its ``weight`` (checkpoint keys do not move): only
its ``__class__`` becomes a subclass of its own class whose ``forward`` calls ``LigerRMSNormFunction``, as this
library's LoRA modules do.

The norm classes are matched by name, each with the arithmetic Liger must use to give the class's own result:
``casting_mode="llama"`` (the input normalised in fp32, cast back to the input's dtype, then times the weight)
and no offset. Gemma's norms (``1 + weight``, computed in fp32 throughout) are not in the table: a model with
none of the listed classes is refused rather than silently left as it is. ``in_place=False``: Liger may write
the input's gradient over the output's gradient, which autograd also hands to the residual branch.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .errors import ConfigError
from .fused_loss import LIGER_INSTALL, liger_available

__all__ = ["FUSED_NORM_CLASSES", "use_fused_norm"]

# HF RMSNorm classes that compute `weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)`.
FUSED_NORM_CLASSES = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm",
                      "MixtralRMSNorm", "Phi3RMSNorm")
_SWAPPED: dict[type, type] = {}  # the norm class -> its Liger subclass (one per class, as for LoRA)


def _liger_forward(self, hidden_states):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # (..., H) -> (..., H); eps from the module itself, fp32 statistics, the cast before the weight ("llama")
    return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _fused_class(cls: type) -> type:
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Liger{cls.__name__}", (cls,), {"forward": _liger_forward, "__module__": __name__})
    return _SWAPPED[cls]


def use_fused_norm(model: nn.Module, device: torch.device) -> int:
    """Swap every RMSNorm of ``model`` whose class is in ``FUSED_NORM_CLASSES`` to Liger's kernel; the count.

    Raises:
        ConfigError: ``liger_kernel`` is not installed, ``device`` is not CUDA (outside the Triton interpreter),
            or the model has none of those classes (a norm with other arithmetic, e.g. Gemma's ``1 + weight``,
            would be computed wrongly by this kernel).
    """
    if not liger_available():
        raise ConfigError(f"`train.fused_norm: liger` needs the liger_kernel package, which is not installed: run "
                          f"`{LIGER_INSTALL}`, or set train.fused_norm=false")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"`train.fused_norm: liger` runs a Triton kernel: the device is {device.type}. Train on "
                          "CUDA (train.device=cuda), set TRITON_INTERPRET=1 on the CPU (the Triton interpreter: slow, "
                          "for tests), or set train.fused_norm=false")
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in FUSED_NORM_CLASSES and isinstance(getattr(module, "variance_epsilon", None), float):
            module.__class__ = _fused_class(cls)
            count += 1
        elif cls in _SWAPPED.values():
            count += 1  # swapped before (a second call changes nothing)
    if count == 0:
        norms = sorted({type(m).__name__ for m in model.modules() if "norm" in type(m).__name__.lower()})
        raise ConfigError(f"`train.fused_norm: liger`: {type(model).__name__} has none of the RMSNorm classes it "
                          f"handles ({', '.join(FUSED_NORM_CLASSES)}); its norms are {norms or 'none'}. "
                          "Set train.fused_norm=false")
    return count
