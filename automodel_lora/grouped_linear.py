"""LoRA on a grouped linear of a user's own MoE code: every row times its group's weight, plus its adapter.

    y[s] = x[s] W_g^T (+ b_g) + scale * (x[s] A_g^T) B_g^T            g = the group of row s
    x (S, in), W (G, out, in), b (G, out), A (G, r, in), B (G, out, r)

The shape of seed d9d's ``GroupedLinear`` (``forward(x, x_groups)``) and of any MoE written outside
transformers: give the groups as ``offsets`` (G,) (cumulative row counts of rows already grouped) or as
``group_ids`` (S,) (any order: the rows are sorted by group here, stably, and the result put back in the
caller's order). The base product is ``grouped_mm``; the adapter runs in the segmented Triton kernels where
they run (CUDA, the CPU interpreter; fp32 / fp16 / bf16), else in grouped products of PyTorch.
"""

from __future__ import annotations

import torch

from .grouped_mm import group_offsets, grouped_mm
from .kernels.backend import use_kernels_for
from .kernels.segmented_lora import segmented_lora

__all__ = ["grouped_lora_linear", "grouped_rows_lora"]


def grouped_rows_lora(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                      scale: float, offsets: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None = None,
                      use_triton: bool = True, transposed: bool = False, fast_launch: bool = True) -> torch.Tensor:
    """``y`` for rows already grouped (``ids`` (S,) ascending, ``offsets`` (G,) their cumulative counts).
    ``weight`` is (G, out, in), or (G, in, out) with ``transposed``; no adapter where ``lora_A`` is None;
    ``fast_launch`` as ``KernelOptions.fast_launch``."""
    y = grouped_mm(x, weight if transposed else weight.transpose(1, 2), offsets)  # (S, out)
    if bias is not None:
        y = y + bias[ids]
    if lora_A is None:
        return y
    if use_triton and use_kernels_for(x):
        return segmented_lora(x, lora_A, lora_B, y, ids, offsets, scale, fast_launch)
    xa = grouped_mm(x.to(lora_A.dtype), lora_A.transpose(1, 2), offsets)  # (S, r)
    return y + (grouped_mm(xa, lora_B.transpose(1, 2), offsets) * scale).to(y.dtype)


def _check_ids(group_ids: torch.Tensor, groups: int) -> None:
    """Every id in ``[0, groups)``: checked here on the CPU; on a GPU by a device-side assert (no host sync:
    a bad id fails the next synchronizing call with a CUDA assertion instead of computing garbage).

    Raises:
        ValueError: (CPU tensors) an id out of range, naming it.
    """
    if group_ids.device.type == "cpu":
        bad = group_ids[(group_ids < 0) | (group_ids >= groups)]
        if bad.numel():
            raise ValueError(f"grouped_lora_linear: group id {int(bad[0])} is outside [0, {groups}) (the weight's "
                             "first dimension); route every row to one of the groups")
        return
    torch._assert_async(((group_ids >= 0) & (group_ids < groups)).all(), "grouped_lora_linear: a group id is out of range")


def grouped_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                        scale: float, *, offsets: torch.Tensor | None = None, group_ids: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, use_triton: bool = True) -> torch.Tensor:
    """``x`` (S, in) through a grouped linear with per-group LoRA (see the module docstring): (S, out).

    Args:
        x: (S, in). weight: (G, out, in). lora_A: (G, r, in). lora_B: (G, out, r). scale: alpha / r.
        offsets: (G,) int cumulative row counts, the rows of x grouped in that order. Or:
        group_ids: (S,) int group of each row, any order.
        bias: (G, out) per-group bias, or None.
        use_triton: the segmented kernels where they run (else grouped products of PyTorch).

    Raises:
        ValueError: neither or both of ``offsets`` / ``group_ids``, shapes that do not chain, or (CPU) a group id
            out of range (on a GPU a device-side assert fails instead).
    """
    if (offsets is None) == (group_ids is None):
        raise ValueError("grouped_lora_linear: give the groups as offsets (cumulative row counts of grouped rows) "
                         "or as group_ids (one per row), not both or neither")
    G, out_features, in_features = weight.shape
    if x.dim() != 2 or x.shape[1] != in_features or lora_A.shape[0::2] != (G, in_features) or \
            lora_B.shape[:2] != (G, out_features) or lora_B.shape[2] != lora_A.shape[1]:
        raise ValueError(f"grouped_lora_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_A "
                         f"{tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)} do not chain; expected x (S, in), "
                         "weight (G, out, in), lora_A (G, r, in), lora_B (G, out, r)")
    if offsets is not None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        ids = torch.repeat_interleave(torch.arange(G, device=x.device), counts, output_size=x.shape[0])
        return grouped_rows_lora(x, weight, lora_A, lora_B, scale, offsets.to(torch.int32), ids, bias, use_triton)
    if group_ids.shape != (x.shape[0],):
        raise ValueError(f"grouped_lora_linear: group_ids {tuple(group_ids.shape)} must hold one group per row of x "
                         f"({x.shape[0]})")
    _check_ids(group_ids, G)
    ids, perm = torch.sort(group_ids, stable=True)
    y = grouped_rows_lora(x[perm], weight, lora_A, lora_B, scale, group_offsets(ids, G), ids, bias, use_triton)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inverse]
