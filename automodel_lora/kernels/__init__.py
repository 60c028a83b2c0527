"""LoRA kernels: ``lora_linear`` (dense frozen base + adapter), ``lora_linear_dequant`` (the same on a
weight dequantized on the fly, e.g. bitsandbytes 4-bit) and ``lora_add`` (adapter on a caller-computed
base output).  Triton on CUDA (and on the CPU under ``TRITON_INTERPRET=1``), pure PyTorch otherwise;
all behind one autograd.Function built on torch custom ops.  ``KernelOptions`` (per call, ``options=``)
says how the Triton path runs.

Modules, in the order the math runs: ``options`` (the settings), ``launch`` (the launch cache),
``dropout`` (Philox keep-masks), ``proj`` (x A^T, dy B), ``expand`` (the low-rank term at full width),
``grad_ab`` (dA, dB), ``gemm`` / ``tma_gemm`` / ``tma_desc`` (the base GEMM with the low-rank term as
a K step), ``dora_grad`` (DoRA's dy * f and magnitude gradient from the output), ``dora_norm`` (DoRA's
row norms from low-rank pieces), ``nf4`` (4-bit weights),
``dispatch`` (which kernels a call takes), ``lora_bias`` (PEFT's bias
on lora_B, folded into the base bias), ``reference`` (the
pure-PyTorch math every kernel is checked against, and the CPU path), ``backend`` (whether Triton runs,
the device guard, the options of a call), ``lora_ops`` (the custom ops torch.compile sees), ``lora`` (the
autograd.Function and the public functions).

Rows grouped by an index (MoE experts, adapters per sequence): ``segment_mm`` (each row times its group's
matrix, added into another tensor), ``segment_tn`` (per-group weight gradients), ``segmented_lora`` (the
two as one autograd.Function); ``gather_mm`` (each row times its own id's matrix, rows in any order: the decode
step of a batch mixing adapters).

Beside the LoRA linear: ``silu_mul`` (a gated MLP's ``act(g) * u`` keeping only g and u for backward; its
kernels, autograd.Function and public function in one file) and ``embedding_lora`` (LoRA on an embedding: the
lookup, the adapter term and the add in one forward kernel; a deterministic per-id backward). Import it from its module,
``from automodel_lora.kernels.silu_mul import silu_mul``: re-exported here, the function would hide the
module of the same name.
"""

from .backend import HAS_TRITON, dropout_keep_mask
from .lora import lora_add, lora_linear, lora_linear_dequant
from .options import KernelOptions, all_programs_resident

__all__ = ["lora_linear", "lora_linear_dequant", "lora_add", "dropout_keep_mask", "HAS_TRITON", "KernelOptions",
           "all_programs_resident"]
