"""automodel_lora: in-place, FQN-preserving LoRA / QLoRA for any PyTorch model.

import automodel_lora as al
n = al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=16))
...train...
al.save_adapter(model, "out/adapter")      # HF PEFT format
"""

from .adapter_io import load_adapter, lora_state_dict, save_adapter
from .config import PeftConfig
from .lora import (
    LinearLoRA,
    TritonLinearLoRA,
    apply_lora_to_linear_modules,
    init_lora_weights,
    is_lora_module,
    lora_modules,
    merge_lora,
    patch_linear_module,
    remove_lora,
    unmerge_lora,
)
from .matcher import ModuleMatcher

__version__ = "0.1.0"

__all__ = [
    "LinearLoRA",
    "ModuleMatcher",
    "PeftConfig",
    "TritonLinearLoRA",
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
    "unmerge_lora",
]
