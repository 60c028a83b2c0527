"""One shrink for the q, k and v projections of an attention block inside ``adapter_batch`` (inference).

``q_proj``, ``k_proj`` and ``v_proj`` read the same input ``x``: the first of them called computes
``x [A_q | A_k | A_v]_k^T`` once, against their detached stacks concatenated along the rank
((K, r_q + r_k + r_v, in), built once per block), and keeps its siblings' column slices of the (M, r_q + r_k +
r_v) result; a sibling called with the very same tensor, unchanged (``x is kept_x`` and the same
``x._version``), takes its slice, any other input gets its own shrink. Every projection runs its own expand.

Groups are found when the block opens: the adapted ``q_proj`` / ``k_proj`` / ``v_proj`` children of one parent
(Llama, Qwen, Mistral naming) with one input width and stack dtype. Where only two of them are adapted those two
share the shrink; a lone one (or a group whose widths or dtypes differ) stays on the per-module path. Calls with
gradient (training) never share.

Kept slices live until their siblings take them: a call of a member with nothing kept for it opens a new round
and drops what the last round kept, a member whose input differs drops its slice, and the block clears every
group when it exits.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch
from torch import nn

__all__ = ["QKV", "SharedShrink", "qkv_groups"]

QKV = ("q_proj", "k_proj", "v_proj")


def qkv_groups(named: list[tuple[str, nn.Module]], dtypes: dict[nn.Module, torch.dtype]) -> list[list[nn.Module]]:
    """The adapted q / k / v siblings of each parent (in q, k, v order) that can share a shrink: two or three
    modules of one parent with one ``in_features`` and one stack dtype (``dtypes``)."""
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for fqn, module in named:
        parent, _, leaf = fqn.rpartition(".")
        if leaf in QKV:
            by_parent.setdefault(parent, {})[leaf] = module
    groups = []
    for children in by_parent.values():
        group = [children[leaf] for leaf in QKV if leaf in children]
        if len(group) > 1 and len({(m.in_features, dtypes[m]) for m in group}) == 1:
            groups.append(group)
    return groups


class SharedShrink:
    """The shared shrink of one group: ``stacks[i]()`` is member ``i``'s detached ``A`` stack (K, r_i, in)."""

    def __init__(self, stacks: list[Callable[[], torch.Tensor]]):
        self._stacks = stacks
        self._fused: torch.Tensor | None = None  # (K, sum r_i, in), at the first shared call
        self._bounds: list[tuple[int, int]] = []  # member i's columns of the fused result
        self._x: torch.Tensor | None = None  # the input the kept slices were computed from
        self._version = -1  # its version then
        self._kept: dict[int, torch.Tensor] = {}  # member -> (M, r_member) slice waiting for its call

    def shrink(self, member: int, x: torch.Tensor, own: torch.Tensor,
               run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(M, r_member) shrink of ``x`` for ``member``: its kept slice when ``x`` is the tensor the round read,
        unchanged; ``run(own)`` (its own stack ``own`` (K, r_member, in)) when its kept slice does not fit;
        else a new round: ``run`` on the fused stack, the siblings' slices kept. ``run(A)``: x's shrink (M, r)."""
        if member in self._kept:
            kept = self._kept.pop(member)
            fits = x is self._x and x._version == self._version
            if not self._kept:
                self._x = None
            return kept if fits else run(own)
        xa = run(self._fused_stack())  # (M, sum r_i)
        slices = [xa[:, a:b] for a, b in self._bounds]
        self._kept = {i: s for i, s in enumerate(slices) if i != member}
        self._x, self._version = x, x._version
        return slices[member]

    def _fused_stack(self) -> torch.Tensor:
        """(K, sum r_i, in): the members' stacks side by side along the rank, built once."""
        if self._fused is None:
            stacks = [stack() for stack in self._stacks]
            ends = list(accumulate(s.shape[1] for s in stacks))
            self._bounds = [(end - s.shape[1], end) for s, end in zip(stacks, ends, strict=True)]
            self._fused = torch.cat(stacks, dim=1)
        return self._fused

    def clear(self) -> None:
        """Drop what is kept and the fused stack (the block's removal: the weights may change before its next
        install)."""
        self._kept, self._x, self._fused = {}, None, None
