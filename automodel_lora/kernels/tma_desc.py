"""What the Hopper TMA GEMM (``tma_gemm.py``) can take, and its TMA descriptors.

A TMA descriptor addresses a row-major 2-D tensor (unit inner stride, 16-byte aligned base and row
stride) in ``block_shape`` tiles.  The GEMM's operands ``Y``, ``Q`` (and ``Rop``) are either row-major
themselves or transposed views of row-major tensors (``W^T``, ``B^T``, ``A^T``: the forward), whose
descriptors address the tensor behind the view.

Descriptors are built per launch, so their host time counts: with a Triton release the direct launch
was tested with (``launch.FAST_LAUNCH_TESTED``) their fields are set directly, skipping
``TensorDescriptor``'s own checks (half of its host time; every caller has checked the same
conditions in ``tma_eligible``); with any other release they are built through its constructor.
"""

from __future__ import annotations

import torch
import triton

from .launch import INTERPRET, MAX_BR, untested_release

try:  # Triton >= 3.4: host-side TMA descriptors (the Hopper base GEMM); without them that GEMM is off
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

# Set the descriptor's fields directly (the field set of the tested releases), else use the constructor.
DIRECT_DESCRIPTORS = untested_release(triton.__version__) is None

_CAPABILITY: dict = {}


def _is_hopper_or_newer(device) -> bool:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = torch.cuda.get_device_capability(idx)[0]
    return _CAPABILITY[idx] >= 9


def is_transposed(t: torch.Tensor) -> bool:
    """A 2-D transposed view of a row-major tensor (unit stride along dim 0)."""
    return t.stride(0) == 1 and t.stride(1) != 1


def tma_ready(t: torch.Tensor, transposed: bool = False) -> bool:
    """A 2-D tensor (or, ``transposed``, the row-major tensor behind a transposed view) that a TMA
    descriptor can address: unit inner stride, 16-byte aligned base and row stride."""
    inner, outer = (t.stride(0), t.stride(1)) if transposed else (t.stride(1), t.stride(0))
    return inner == 1 and t.data_ptr() % 16 == 0 and (outer * t.element_size()) % 16 == 0


def tma_operands_ready(x, y, q, R: int) -> bool:
    """The conditions the TMA GEMM puts on x ``(M, K)``, y ``(K, N)``, q ``(R, N)`` and the rank R: Hopper or
    newer (or the interpreter), 16-bit activations on the GPU, rank <= 64 (one rank tile), ``y``, ``q`` both
    transposed views of row-major (N, K) / (N, R) tensors or both row-major, all TMA-addressable."""
    if TensorDescriptor is None:
        return False
    if INTERPRET:
        if x.device.type != "cpu":
            return False
    elif not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _is_hopper_or_newer(x.device)):
        return False
    if y.dtype != x.dtype or not 0 < R <= MAX_BR or q.dtype not in (x.dtype, torch.float32):
        return False
    b_nk = is_transposed(y)
    if b_nk != is_transposed(q):
        return False
    return (y.shape[1] * x.element_size()) % 16 == 0 and tma_ready(x) and tma_ready(y, b_nk) and tma_ready(q, b_nk)


def tma_eligible(x, y, pm, q) -> bool:
    """Whether ``gemm_lora(x, y, pm, q)`` runs the TMA kernel: :func:`tma_operands_ready`, and ``pm`` in x's
    dtype with unit stride along the rank (the kernel reads its rows with plain loads)."""
    return (pm is not None and pm.dtype == x.dtype and pm.stride(1) == 1
            and tma_operands_ready(x, y, q, pm.shape[1]))


def tma_eligible_proj(x, y, rop, q) -> bool:
    """Whether ``gemm_lora_proj(x, y, rop, q)`` can run: as :func:`tma_eligible`, with ``rop`` ``(K, R)`` in
    x's dtype or fp32, a transposed view of a row-major ``(R, K)`` tensor or row-major itself, TMA-addressable."""
    return (rop is not None and rop.dtype in (x.dtype, torch.float32) and rop.shape[0] == x.shape[1]
            and rop.shape[1] == q.shape[0]
            and tma_operands_ready(x, y, q, rop.shape[1]) and tma_ready(rop, is_transposed(rop)))


_new_object = object.__new__


def tma_desc(t: torch.Tensor, block, transposed: bool = False):
    """TMA descriptor of ``t`` (row-major), or with ``transposed`` of the row-major tensor behind the
    transposed view ``t``, built without materialising that tensor's view."""
    if not DIRECT_DESCRIPTORS:
        if transposed:
            return TensorDescriptor(t, [t.shape[1], t.shape[0]], [t.stride(1), 1], block)
        return TensorDescriptor(t, [t.shape[0], t.shape[1]], [t.stride(0), 1], block)
    desc = _new_object(TensorDescriptor)  # padding / round_f32_to_tf32 keep their class defaults
    desc.base = t
    if transposed:
        desc.shape, desc.strides = [t.shape[1], t.shape[0]], [t.stride(1), 1]
    else:
        desc.shape, desc.strides = [t.shape[0], t.shape[1]], [t.stride(0), 1]
    desc.block_shape = block
    return desc
