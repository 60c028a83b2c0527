"""Inverted dropout without a stored mask: a Philox keep-mask regenerated from a seed.

    keep[m, d] = u(seed, m * ceil(D / 4) + d // 4, lane d % 4) >= p    over the (M, D) index space
    drop(t)    = t * keep / (1 - p)

with ``u`` the four uniform floats of one Philox-4x32 call (``tl.randint4x``): one call serves four adjacent
elements of a row, where ``tl.rand`` per element would compute four and keep one. Mask generation is
integer work on every element of x for the forward's ``proj``, ``tn2`` and the dx term (three or four times a
step with recomputation): a quarter of the Philox calls is what makes dropout cheap there. The tiles that call
``philox_keep`` start at multiples of 4 columns and are at least 4 wide (every ``BK`` / ``BN`` / ``BD``).

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
    """Philox keep-mask for elements (rows64[:, None], cols[None, :]) of an (M, D) tensor; ``cols`` a run of
    consecutive columns starting at a multiple of 4, its length a multiple of 4."""
    seed = tl.load(seed_ptr)
    BR: tl.constexpr = rows64.shape[0]
    BC: tl.constexpr = cols.shape[0]
    quads = tl.min(tl.reshape(cols, (BC // 4, 4)), axis=1) // 4  # (BC/4,) the column group of each 4 lanes
    counters = rows64[:, None] * ((D + 3) // 4) + quads[None, :].to(tl.int64)  # (BR, BC/4)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    # lanes in column order: join(join(r0, r2), join(r1, r3))[..., i, j] is lane 2 i + j
    u = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BR, BC))
    return tl.random.uint_to_uniform_float(u) >= p


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
