"""Inverted dropout without a stored mask: a Philox keep-mask regenerated from a seed.

    keep[m, d] = rand(seed, m * D + d) >= p        over the logical (M, D) index space of the masked tensor
    drop(t)    = t * keep / (1 - p)

Forward and backward derive exactly the same mask from the one-element int64 ``seed`` tensor, so
nothing of size ``(M, D)`` is saved.  ``philox_keep`` is the ``@triton.jit`` helper the kernels call
on their tiles; ``keep_mask`` materialises a whole mask (tests and the reference only: the kernels
never store it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv


@triton.jit
def philox_keep(seed_ptr, rows64, cols, D, p):
    """Philox keep-mask for elements (rows64[:, None], cols[None, :]) of an (M, D) tensor."""
    seed = tl.load(seed_ptr)
    offs = rows64[:, None] * D + cols[None, :].to(tl.int64)
    return tl.rand(seed, offs) >= p


@triton.jit
def _mask_kernel(seed_ptr, o_ptr, M, D, p, BM: tl.constexpr, BD: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    rm64 = rm.to(tl.int64)
    keep = philox_keep(seed_ptr, rm64, rd, D, p)
    mask = (rm < M)[:, None] & (rd < D)[None, :]
    tl.store(o_ptr + rm64[:, None] * D + rd[None, :], keep.to(tl.int8), mask=mask)


def keep_mask(seed: torch.Tensor, M: int, D: int, p: float, device) -> torch.Tensor:
    """The ``(M, D)`` bool keep-mask the kernels use for ``seed`` (for tests / references)."""
    out = torch.empty((M, D), dtype=torch.int8, device=device)
    if M and D:
        _mask_kernel[(cdiv(M, 32), cdiv(D, 64))](seed, out, M, D, float(p), BM=32, BD=64)
    return out.bool()
