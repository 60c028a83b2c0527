"""bitsandbytes NF4 weights dequantized by one Triton kernel.

Layout (bitsandbytes 0.4x-0.50, ``quantize_4bit``): the weight's ``n = N * K`` values, flattened
row-major, are packed two per byte, the first in the high nibble.  Value ``i`` is
``code[nibble_i] * absmax[i // blocksize]`` in fp32, rounded once to the output dtype.  With nested
statistics ("compress_statistics", QLoRA's default) ``absmax`` is itself 8-bit:
``absmax[b] = code2[absmax8[b]] * absmax2[b // blocksize2] + offset``.

Why a kernel of our own: bitsandbytes' ``dequantize_4bit`` is a Python wrapper, a custom-op dispatch,
a second op for the nested statistics, a torch add and a ctypes call; on the H100 machine's CPU it
measured ~106 us of host time per call (benchmarks/DESIGN.md), and a QLoRA layer calls it
twice per step.  This kernel is one cached launch that computes the same fp32 products (fp-contraction
off, so the nested ``mul + add`` rounds as bitsandbytes' two separate ops do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import bench, cdiv, configs, launch, m_bucket, run_cached


@triton.jit
def _dequant_nf4_kernel(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr,
    n_bytes, n_out,
    HALF_BLOCK: tl.constexpr,  # bytes per quantization block (blocksize / 2)
    BLOCK2: tl.constexpr,  # absmax entries per absmax2 entry (nested statistics)
    NESTED: tl.constexpr,
    BYTES: tl.constexpr,  # packed bytes per program; it writes 2 * BYTES values
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BYTES + tl.arange(0, BYTES)  # byte index, int64 (n may pass 2**31)
    ok = offs < n_bytes
    q = tl.load(packed_ptr + offs, mask=ok, other=0).to(tl.int32)
    blk = offs // HALF_BLOCK  # a byte never straddles a block: every blocksize is even
    if NESTED:
        a8 = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + blk // BLOCK2, mask=ok, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    hi = tl.load(code_ptr + (q >> 4)) * scale  # value 2i
    lo = tl.load(code_ptr + (q & 15)) * scale  # value 2i + 1
    vals = tl.interleave(hi, lo)  # (2 * BYTES,): hi0, lo0, hi1, lo1, ...
    o = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + o, vals.to(out_ptr.dtype.element_ty), mask=o < n_out)


_dequant_tuned = triton.autotune(
    configs=configs([
        (dict(BYTES=512), 4, 1),
        (dict(BYTES=1024), 4, 1),
        (dict(BYTES=2048), 8, 1),
        (dict(BYTES=4096), 8, 1),
    ]),
    key=["n_bytes", "NESTED"], do_bench=bench,
)(_dequant_nf4_kernel)

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def nf4_supported(quant_state, packed: torch.Tensor) -> bool:
    """True when :func:`dequantize_nf4` handles this bitsandbytes weight: NF4; code tables and statistics
    in the dtypes bitsandbytes makes (fp32, or nested 8-bit) and on the weight's device; the packed bytes
    in bitsandbytes' ``(ceil(n/2), 1)`` column (any storage dtype), enough of them for the ``n`` values of
    ``quant_state.shape``."""
    code = quant_state.code
    if quant_state.quant_type != "nf4" or quant_state.blocksize % 2 or code is None or code.dtype != torch.float32:
        return False
    if not (packed.is_contiguous() and packed.dim() == 2 and packed.shape[1] == 1):
        return False
    n = 1
    for d in quant_state.shape:
        n *= d
    if packed.numel() * packed.element_size() < (n + 1) // 2:
        return False
    device = packed.device
    tensors = [code, quant_state.absmax]
    n_blocks = -(-n // quant_state.blocksize)
    if quant_state.absmax.numel() < n_blocks:
        return False
    if quant_state.nested:
        state2, offset = quant_state.state2, quant_state.offset
        if not (isinstance(offset, torch.Tensor) and offset.numel() == 1 and offset.dtype == torch.float32):
            return False
        if (quant_state.absmax.dtype != torch.uint8 or state2.absmax.dtype != torch.float32
                or state2.code.dtype != torch.float32 or state2.dtype != torch.float32
                or state2.absmax.numel() < -(-n_blocks // state2.blocksize)):
            return False
        tensors += [state2.code, state2.absmax, offset]
    elif quant_state.absmax.dtype != torch.float32:
        return False
    return all(t.device == device for t in tensors)


def dequantize_nf4(packed: torch.Tensor, quant_state, dtype: torch.dtype, *,
                   fast_launch: bool = True) -> torch.Tensor:
    """The dense weight of a bitsandbytes NF4 tensor, ``quant_state.shape``, in ``dtype``.

    Equal to ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)`` with ``quant_state.dtype =
    dtype`` (the same fp32 products, rounded once).  ``packed`` is the ``Params4bit`` data; check
    :func:`nf4_supported` first.  ``fast_launch``: as ``KernelOptions.fast_launch``.

    Raises:
        ValueError: ``dtype`` is not bf16/fp16/fp32.
    """
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"NF4 weights dequantize to one of {_OUT_DTYPES}, got {dtype}")
    shape = tuple(quant_state.shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n_out = out.numel()
    if n_out == 0:
        return out
    # bitsandbytes may store the bytes as bf16 etc. (FSDP "quant_storage"); uint8 needs no view (host time)
    q8 = packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)
    n_bytes = (n_out + 1) // 2
    nested = quant_state.nested
    absmax = quant_state.absmax
    if nested:
        state2 = quant_state.state2
        absmax2, code2, offset, block2 = state2.absmax, state2.code, quant_state.offset, state2.blocksize
    else:
        absmax2 = code2 = offset = absmax  # unread
        block2 = 1
    ptrs = (q8, absmax, quant_state.code, absmax2, code2, offset, out)
    half_block = quant_state.blocksize // 2
    sig = ("dequant_nf4", q8.get_device(), n_out, dtype, half_block, block2, nested)
    if run_cached(sig, ptrs, fast=fast_launch):
        return out
    launch(
        "dequant_nf4", _dequant_tuned, _dequant_nf4_kernel,
        lambda meta: (cdiv(n_bytes, meta["BYTES"]),), dict(BYTES=64),
        (m_bucket(n_bytes), nested), ptrs, (n_bytes, n_out),
        dict(HALF_BLOCK=half_block, BLOCK2=block2, NESTED=nested, enable_fp_fusion=False), sig, fast_launch,
    )
    return out
