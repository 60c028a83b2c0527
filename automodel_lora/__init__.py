"""automodel_lora: in-place, FQN-preserving LoRA / QLoRA for any PyTorch model.

import automodel_lora as al
n = al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=16))
...train...
al.save_adapter(model, "out/adapter")      # HF PEFT format
"""

import warnings

from .adapter_format import AdapterFormatError
from .adapter_io import load_adapter, lora_state_dict, save_adapter
from .config import LoraSettings, PeftConfig
from .injection import (
    apply_lora_to_linear_modules,
    init_lora_weights,
    merge_lora,
    remove_lora,
    set_kernel_options,
    unmerge_lora,
)
from .kernels.options import KernelOptions
from .lora import FusedLinearLoRA, LinearLoRA, is_lora_module, lora_modules, patch_linear_module
from .matcher import ModuleMatcher

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "FusedLinearLoRA",
    "KernelOptions",
    "LinearLoRA",
    "LoraSettings",
    "ModuleMatcher",
    "PeftConfig",
    "apply_lora_to_linear_modules",
    "init_lora_weights",
    "is_lora_module",
    "load_adapter",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "patch_linear_module",
    "remove_lora",
    "save_adapter",
    "set_kernel_options",
    "unmerge_lora",
]


def __getattr__(name: str):
    if name == "TritonLinearLoRA":  # deprecated name: the class fuses on every device, Triton only on CUDA
        warnings.warn("TritonLinearLoRA is deprecated; it is FusedLinearLoRA", DeprecationWarning, stacklevel=2)
        return FusedLinearLoRA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
