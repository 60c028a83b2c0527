"""Grouped (segmented) matrix products: rows sorted by group, each group times its own matrix.

    y[s] = x[s] @ w[g]        for every row s in group g = rows offsets[g-1] .. offsets[g]-1

``x`` (S, K) holds the rows of group 0, then group 1, ...; ``w`` (G, K, N); ``offsets`` (G,) int32,
the cumulative row counts, ``offsets[-1] == S`` (rows past it are not computed: zero on the loop path, left
uninitialised by the grouped GEMM). A group may be empty.
This is the shape of MoE experts (rows = token-expert pairs sorted by expert) and of a batch mixing
adapters (rows sorted by adapter). On CUDA with 16-bit operands whose rows are 16-byte aligned it runs
PyTorch's grouped GEMM (``torch.nn.functional.grouped_mm``: one launch, autograd included); elsewhere
a loop over the groups (which reads ``offsets`` on the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm", "group_offsets"]


def group_offsets(sorted_ids: torch.Tensor, groups: int) -> torch.Tensor:
    """(G,) int32 cumulative row counts of ``sorted_ids`` (S,), group ids in ``[0, groups)`` in ascending order.
    ``histc`` rather than ``bincount``: no host sync (a CUDA graph can hold it)."""
    src = sorted_ids.float() if sorted_ids.device.type != "cuda" else sorted_ids.int()
    counts = torch.histc(src, bins=groups, min=0, max=groups - 1)
    return torch.cumsum(counts, dim=0, dtype=torch.int32)


def _native(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether PyTorch's grouped GEMM takes these operands: CUDA, one 16-bit dtype, 16-byte rows and strides."""
    if not (x.is_cuda and hasattr(F, "grouped_mm") and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    size = x.element_size()
    strides = (x.stride(0), w.stride(1) if w.stride(2) == 1 else w.stride(2), w.stride(0))
    return x.stride(1) == 1 and 1 in w.stride()[1:] and all(s * size % 16 == 0 for s in strides) and \
        x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``y`` (S, N): each group's rows of ``x`` (S, K) times its ``w[g]`` (K, N) (see the module docstring).

    Raises:
        ValueError: shapes that do not chain, or ``offsets`` not one entry per group.
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x {tuple(x.shape)} and w {tuple(w.shape)} do not chain; expected x (S, K) "
                         "and w (G, K, N)")
    if offsets.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: offsets {tuple(offsets.shape)} must hold one cumulative count per group "
                         f"({w.shape[0]})")
    if _native(x, w):
        return F.grouped_mm(x, w, offs=offsets)
    ends = offsets.tolist()
    parts, start = [], 0
    for g, end in enumerate(ends):
        parts.append(x[start:end] @ w[g])  # (rows of g, N); empty for an empty group
        start = end
    if start < x.shape[0]:  # rows past the last offset: not computed
        parts.append(x.new_zeros(x.shape[0] - start, w.shape[2]))
    return torch.cat(parts)
