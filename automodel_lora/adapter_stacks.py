"""Persistent adapter stacks for mixed batches (``adapter_batch``): named adapters packed once per module.

    al.stack_adapters(model, ["french", "german", "code"], max_num_loras=8)   # room for 8, ranks up to the largest
    with al.adapter_batch(model, ["code", "french", None]): ...               # reads the stacks: no copy per block
    al.stack_adapters(model, ["legal"])          # into a free slot: no buffer is reallocated
    al.unstack_adapters(model, ["german"])       # its slot is freed (zeroed)

Every adapted linear gets ``A`` (capacity, r_max, in) and ``B`` (capacity, out, r_max) buffers (an adapter's scale
folded into its ``B``, a smaller rank padded with zeros; a module without the adapter holds zeros there). Slots are
the same on every module: a name's slot, model-wide. Adding an adapter fills a free slot in place when there is
one and its rank fits; otherwise every stack is rebuilt with the room needed. A slot records the versions of the
parameters it was copied from; ``adapter_batch`` refreshes a slot whose adapter changed since (trained, loaded), so
a stack is never stale. Stacks are for inference: a training step rebuilds its stacks from the parameters (the
gradient must reach them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_slots import adapter_names, holder_of
from .lora import LinearLoRA, lora_modules

__all__ = ["stack_adapters", "unstack_adapters", "stacked_slots", "stacks_for", "stacked_buffers", "padded_adapter"]

STACK = "lora_stack"  # the attribute of an adapted linear holding its AdapterStack


class AdapterStack:
    """One module's stack: buffers ``A`` (capacity, rank, in), ``B`` (capacity, out, rank), and per slot the
    source parameters' versions (None: free or filled with zeros)."""

    def __init__(self, module: LinearLoRA, capacity: int, rank: int, dtype: torch.dtype):
        device = module.weight.device
        self.A = torch.zeros(capacity, rank, module.in_features, device=device, dtype=dtype)
        self.B = torch.zeros(capacity, module.out_features, rank, device=device, dtype=dtype)
        self.versions: list = [None] * capacity

    @torch.no_grad()
    def fill(self, module: LinearLoRA, slot: int, holder: nn.Module | None) -> None:
        """Slot ``slot`` from ``holder``'s adapter (zeros for None)."""
        A, B = padded_adapter(module, holder, self.A.shape[1], self.A.dtype)
        self.A[slot].copy_(A)
        self.B[slot].copy_(B)
        self.versions[slot] = None if holder is None else _version(holder)


def padded_adapter(module: LinearLoRA, holder: nn.Module | None, rank: int, dtype: torch.dtype):
    """``(A (rank, in), s B (out, rank))`` of ``holder``'s adapter of ``module``, zero-padded to ``rank`` and in
    ``dtype`` (zeros for None): an adapter's entry of a stack (differentiable where the weights are)."""
    if holder is None:
        device = module.weight.device
        return (torch.zeros(rank, module.in_features, device=device, dtype=dtype),
                torch.zeros(module.out_features, rank, device=device, dtype=dtype))
    pad = rank - holder.lora_settings.dim
    return (F.pad(holder.lora_A.weight.to(dtype), (0, 0, 0, pad)),
            F.pad(holder.lora_B.weight.to(dtype) * holder.lora_settings.scale, (0, pad)))


def _version(holder: nn.Module) -> tuple:
    return holder.lora_A.weight._version, holder.lora_B.weight._version, id(holder.lora_A.weight)


def _linears(model: nn.Module) -> list[LinearLoRA]:
    return [m for _, m in lora_modules(model) if isinstance(m, LinearLoRA)]


def stacked_slots(model: nn.Module) -> dict[str, int]:
    """{adapter name: its slot} of the model's stacks (empty without stacks)."""
    return dict(getattr(model, "_lora_stack_slots", {}))


def stack_adapters(model: nn.Module, names: list[str], max_num_loras: int | None = None) -> dict[str, int]:
    """Pack ``names`` (beside what is stacked already) into every adapted linear's stack; returns {name: slot}.

    Args:
        model: a model with named adapters.
        names: adapters to stack (already stacked ones are refreshed in place).
        max_num_loras: the stacks' capacity (room for later adapters without reallocating); default: what is
            needed now.

    Raises:
        ValueError: an unknown adapter name, or ``max_num_loras`` below the number
            of adapters to hold.
    """
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"stack_adapters: {type(model).__name__} has no adapter {unknown[0]!r}; it has {known}")
    slots = stacked_slots(model)
    wanted = list(slots) + [n for n in names if n not in slots]
    capacity = max(max_num_loras or 0, len(wanted))
    if max_num_loras is not None and max_num_loras < len(wanted):
        raise ValueError(f"stack_adapters: max_num_loras={max_num_loras} cannot hold {len(wanted)} adapters "
                         f"({wanted}); raise it or unstack some first")
    linears = _linears(model)
    ranks = {h.lora_settings.dim for m in linears for n in wanted if (h := holder_of(m, n)) is not None}
    rank = max(ranks, default=1)
    current = [getattr(m, STACK, None) for m in linears]
    fits = all(s is not None and s.A.shape[0] >= capacity and s.A.shape[1] >= rank for s in current)
    if not fits:  # rebuild every stack with the room needed; the slots keep their order
        slots = {n: i for i, n in enumerate(wanted)}
        for m in linears:
            dtype = m.weight.dtype if m.weight.is_floating_point() else m.lora_A.weight.dtype
            m.__dict__[STACK] = AdapterStack(m, capacity, rank, dtype)
    else:
        free = [i for i in range(current[0].A.shape[0]) if i not in slots.values()]
        slots.update({n: free.pop(0) for n in wanted if n not in slots})
    for m in linears:
        for n in names if fits else wanted:
            m.__dict__[STACK].fill(m, slots[n], holder_of(m, n))
    model.__dict__["_lora_stack_slots"] = slots
    return dict(slots)


def unstack_adapters(model: nn.Module, names: list[str] | None = None) -> None:
    """Free the slots of ``names`` (zeroed, ready for another adapter), or with None drop every stack."""
    slots = stacked_slots(model)
    for m in _linears(model):
        stack = m.__dict__.get(STACK)
        if stack is None:
            continue
        if names is None:
            del m.__dict__[STACK]
            continue
        for n in names:
            if n in slots:
                stack.fill(m, slots[n], None)
    model.__dict__["_lora_stack_slots"] = {} if names is None else {n: s for n, s in slots.items() if n not in names}


def stacks_for(model: nn.Module, linears: list[LinearLoRA], names: list[str]) -> dict[str, int] | None:
    """{name: slot} where the model's stacks hold every one of ``names`` (each slot refreshed if its adapter
    changed since it was filled), else None (the block builds its own)."""
    slots = stacked_slots(model)
    if not names or any(n not in slots for n in names) or any(STACK not in m.__dict__ for m in linears):
        return None
    for m in linears:
        stack = m.__dict__[STACK]
        for n in names:
            holder = holder_of(m, n)
            if (None if holder is None else _version(holder)) != stack.versions[slots[n]]:
                stack.fill(m, slots[n], holder)
    return {n: slots[n] for n in names}


def stacked_buffers(module: LinearLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's stack buffers ``(A, B)``."""
    stack = module.__dict__[STACK]
    return stack.A, stack.B

