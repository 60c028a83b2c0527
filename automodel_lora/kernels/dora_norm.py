"""DoRA's row norms of ``W + s B A`` from low-rank pieces, in one launch:

    norm_j = sqrt(max(||W_j||^2 + 2 s B_j . (W A^T)_j + s^2 B_j (A A^T) B_j^T, 0))     (N,) fp32

    wsq (N,) fp32: ||W_j||^2 (cached per base weight by the caller); wa (N, r): W A^T in W's dtype;
    B (N, r) any float dtype; G (r, r) fp32: A A^T

The caller makes ``wa`` (the one read of W per step) and ``G`` (r x r); everything after them, which in PyTorch is
about ten small ops (casts, two products, two row sums, scalings, a clamp, a square root), is one program per
``BN`` rows here: ``B G`` as an fp32 dot of a ``(BN, BR)`` and a ``(BR, BR)`` tile, then the two row sums. Bytes
are ``N r`` of ``wa`` and ``B`` and ``N`` of ``wsq``: microseconds; what it saves is host time per DoRA call.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch_fixed, next_pow2

MAX_RANK = 128  # larger ranks take the PyTorch path (a (BN, r) fp32 tile per program would spill)


@triton.jit
def _dora_norm_kernel(wsq_ptr, wa_ptr, b_ptr, g_ptr, out_ptr, N, R, swn, swr, sbn, sbr, scale,
                      BN: tl.constexpr, BR: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    n_ok, r_ok = rn < N, rr < R
    tile = n_ok[:, None] & r_ok[None, :]
    rn64 = rn.to(tl.int64)
    b = tl.load(b_ptr + rn64[:, None] * sbn + rr[None, :] * sbr, mask=tile, other=0.0).to(tl.float32)  # (BN, BR)
    wa = tl.load(wa_ptr + rn64[:, None] * swn + rr[None, :] * swr, mask=tile, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rr[:, None] * R + rr[None, :], mask=r_ok[:, None] & r_ok[None, :], other=0.0)  # (BR, BR)
    bg = tl.dot(b, g, input_precision="ieee")  # (BN, BR): B_j G
    wsq = tl.load(wsq_ptr + rn, mask=n_ok, other=0.0)
    sq = wsq + (2.0 * scale) * tl.sum(b * wa, axis=1) + (scale * scale) * tl.sum(bg * b, axis=1)
    tl.store(out_ptr + rn, tl.sqrt(tl.maximum(sq, 0.0)), mask=n_ok)


def dora_norm(wsq: torch.Tensor, wa: torch.Tensor, lora_B: torch.Tensor, aat: torch.Tensor, scale: float,
              fast_launch: bool = True) -> torch.Tensor:
    """``||W + s B A||_row`` ``(N,)`` fp32 from ``wsq`` (N,) fp32, ``wa`` = W A^T (N, r), ``lora_B`` (N, r) (any strides)
    and ``aat`` = A A^T (r, r) fp32 (see the module docstring). Launches on the current device: the caller sets
    it (``backend.on_device_of``).

    Raises:
        ValueError: shapes that do not chain, or a rank over ``MAX_RANK``.
    """
    N, R = wa.shape
    if lora_B.shape != (N, R) or wsq.shape != (N,) or aat.shape != (R, R) or R > MAX_RANK:
        raise ValueError(f"dora_norm: wsq {tuple(wsq.shape)}, wa {tuple(wa.shape)}, lora_B {tuple(lora_B.shape)}, "
                         f"aat {tuple(aat.shape)} do not chain (expected (N,), (N, r), (N, r), (r, r), r <= "
                         f"{MAX_RANK})")
    out = torch.empty(N, device=wa.device, dtype=torch.float32)
    if N == 0:
        return out
    wsq, aat = wsq.float().contiguous(), aat.float().contiguous()
    BR = max(16, next_pow2(R))
    BN = 64 if BR <= 32 else 16
    ptrs = (wsq, wa, lora_B, aat, out)
    scalars = (N, R, *wa.stride(), *lora_B.stride(), float(scale))
    launch_fixed(_dora_norm_kernel, (cdiv(N, BN),), dict(BN=BN, BR=BR), ptrs, scalars, {}, fast_launch)
    return out
