"""LoRA kernels: ``lora_linear`` (dense frozen base + adapter), ``lora_linear_dequant`` (the same on a
weight dequantized on the fly, e.g. bitsandbytes 4-bit) and ``lora_add`` (adapter on a caller-computed
base output).  Triton on CUDA (and on the CPU under ``TRITON_INTERPRET=1``), pure PyTorch otherwise;
all behind one autograd.Function built on torch custom ops."""

from .lora import (
    HAS_TRITON,
    dropout_keep_mask,
    get_base_gemm,
    get_fuse_proj,
    lora_add,
    lora_linear,
    lora_linear_dequant,
    set_base_gemm,
    set_fuse_proj,
)

__all__ = ["lora_linear", "lora_linear_dequant", "lora_add", "dropout_keep_mask", "set_base_gemm",
           "get_base_gemm", "set_fuse_proj", "get_fuse_proj", "HAS_TRITON"]
