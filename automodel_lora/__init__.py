"""automodel_lora: in-place, FQN-preserving LoRA / QLoRA for any PyTorch model.

import automodel_lora as al
n = al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=16))
...train...
al.save_adapter(model, "out/adapter")      # HF PEFT format
"""

import importlib
import warnings

# Names are imported on first use (PEP 562), so `import automodel_lora` -- and the
# `automodel-lora` console script's --help / --version / recipes / cp -- load no torch.
_LAZY = {
    "AdapterFormatError": ".adapter_format",
    "CAUSAL_SDPA": ".sdpa_capture",
    "causal_sdpa": ".sdpa_capture",
    "adapter_batch": ".mixed_adapters",
    "stack_adapters": ".adapter_stacks",
    "unstack_adapters": ".adapter_stacks",
    "load_adapter": ".adapter_io",
    "lora_state_dict": ".adapter_io",
    "save_adapter": ".adapter_io",
    "LoraSettings": ".config",
    "PeftConfig": ".config",
    "apply_lora_to_linear_modules": ".injection",
    "init_lora_weights": ".injection",
    "EmbeddingLoRA": ".embedding_lora",
    "GraphCaptureError": ".graphed_step",
    "GraphedStep": ".graphed_step",
    "grouped_lora_linear": ".grouped_linear",
    "patch_embedding_module": ".embedding_lora",
    "merge_and_save": ".merged_save",
    "merge_lora": ".injection",
    "remove_lora": ".injection",
    "set_kernel_options": ".injection",
    "unmerge_lora": ".injection",
    "KernelOptions": ".kernels.options",
    "FusedLinearLoRA": ".lora",
    "LinearLoRA": ".lora",
    "is_lora_module": ".lora",
    "lora_modules": ".lora",
    "patch_linear_module": ".lora",
    "ModuleMatcher": ".matcher",
    "active_adapter": ".named_adapters",
    "adapter_names": ".named_adapters",
    "add_weighted_adapter": ".named_adapters",
    "delete_adapter": ".named_adapters",
    "disable_adapter": ".named_adapters",
    "set_adapter": ".named_adapters",
}

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "CAUSAL_SDPA",
    "EmbeddingLoRA",
    "FusedLinearLoRA",
    "GraphCaptureError",
    "GraphedStep",
    "KernelOptions",
    "LinearLoRA",
    "LoraSettings",
    "ModuleMatcher",
    "PeftConfig",
    "active_adapter",
    "adapter_batch",
    "adapter_names",
    "add_weighted_adapter",
    "apply_lora_to_linear_modules",
    "causal_sdpa",
    "delete_adapter",
    "disable_adapter",
    "grouped_lora_linear",
    "init_lora_weights",
    "is_lora_module",
    "load_adapter",
    "lora_modules",
    "lora_state_dict",
    "merge_and_save",
    "merge_lora",
    "patch_embedding_module",
    "patch_linear_module",
    "remove_lora",
    "save_adapter",
    "set_adapter",
    "set_kernel_options",
    "stack_adapters",
    "unmerge_lora",
    "unstack_adapters",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name == "TritonLinearLoRA":  # deprecated name: the class fuses on every device, Triton only on CUDA
        warnings.warn("TritonLinearLoRA is deprecated; it is FusedLinearLoRA", DeprecationWarning, stacklevel=2)
        return __getattr__("FusedLinearLoRA")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
