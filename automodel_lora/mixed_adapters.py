"""Many adapters in one batch: each sequence runs with its own named adapter (or none), in one forward.

    al.load_adapter(model, "out/french", adapter_name="french")
    al.load_adapter(model, "out/german", adapter_name="german")
    with al.adapter_batch(model, ["french", "german", None, "french"]):   # one entry per sequence
        logits = model(input_ids=ids).logits           # (4, T, V): row 2 is the base model's
        out = model.generate(ids, max_new_tokens=32)   # prefill and decode alike

Inside the block every adapted linear uses the model's persistent stacks where ``stack_adapters`` has packed every
adapter of the batch (``adapter_stacks``), else stacks the batch's K distinct adapters into ``A`` (K, r_max, in) and
``B`` (K, out, r_max) (each adapter's scale folded into its ``B``; a smaller rank padded with zeros; a
module without one of the adapters gets zeros for it, i.e. its base output, as ``set_adapter`` gives) and
computes ``y = x W^T + b + (x A_k^T) B_k^T`` with ``k`` the adapter of the row's sequence: the segmented
kernels (``kernels/segment_mm.py``: rows grouped by an index, as MoE experts are) where they run, else a
loop over the adapters in PyTorch. Rows are the leading ``batch`` entries of the input (``(B, T, in)``, or
``(B * T, in)`` batch-major), so the same code serves prefill (T rows per sequence) and decode (one); decode
without gradient takes the gather kernel instead (``kernels/gather_mm.py``: each row reads its own adapter,
where a block of segmented rows would loop over up to one adapter per row). Without gradient, the adapted
``q_proj`` / ``k_proj`` / ``v_proj`` of one attention block share one shrink of their common input
(``fused_shrink.py``; ``fuse_qkv=False`` turns it off).
Integer ids index :func:`automodel_lora.adapter_names` (HF / MAX ``lora_ids``), -1 meaning none.

Training several adapters in one batch: with the model in ``train()`` mode every adapter of the batch is
trainable inside the block (the former flags come back on exit) and each gets the gradient of its own
sequences' loss only: the stacks are then rebuilt from the parameters per call (a copy of the small adapter
tensors, through which autograd reaches each adapter), and the segmented kernels need the sequences grouped
by adapter with the base-only ones last (``["a", "a", "b", None]``; another order takes the PyTorch loop).
No dropout in training mode (refused): a mask per adapter is not built. Outside training (``eval()``, or
no gradient needed) the stacks are built once per block, detached, at the first call. With activation
checkpointing, run backward inside the block too: the recompute calls the modules' forward again.

Adapters of linear modules: plain LoRA, DoRA and ``lora_bias`` (their row scales and shifts per sequence,
``mixed_epilogue.py``); embedding and expert adapters are refused, as is a merged model. Each module's
``forward`` is overridden on the instance for the block only, so nothing changes outside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch import nn

from .adapter_slots import adapter_names, adapter_weights, check_not_in_disabled_block, holder_of
from .adapter_stacks import padded_adapter, stacked_buffers, stacked_slots, stacks_for
from .embedding_lora import is_embedding_lora
from .experts_lora import experts_lora_modules
from .fused_shrink import SharedShrink, qkv_groups
from .kernels.backend import use_kernels_for
from .kernels.gather_mm import gather_mm, gathered_product
from .kernels.segment_mm import segment_mm
from .kernels.segmented_lora import segmented_lora
from .lora import LinearLoRA, lora_modules
from .mixed_epilogue import Epilogue

__all__ = ["adapter_batch"]


class _Rows:
    """The batch's adapter index per sequence, and per row of an input (cached per rows-per-sequence)."""

    def __init__(self, seq_ids: torch.Tensor, groups: int, train: bool):
        self.seq_ids = seq_ids  # (batch,) int64, -1 for none
        self.train = train
        # rows grouped by adapter (ids non-decreasing, the base-only sequences last): what the segmented
        # weight-gradient kernel needs (contiguous rows per adapter)
        known = seq_ids[seq_ids >= 0]
        self.grouped = bool((known[1:] >= known[:-1]).all()) and bool((seq_ids[: known.numel()] >= 0).all())
        self.counts = torch.bincount(known, minlength=groups)  # (K,) sequences per adapter
        self._cache: dict[tuple, torch.Tensor] = {}

    def _per_seq(self, x: torch.Tensor) -> int:
        rows, batch = x.numel() // x.shape[-1], self.seq_ids.numel()
        if (x.dim() > 2 and x.shape[0] != batch) or rows % batch:
            raise ValueError(f"adapter_batch: an input of shape {tuple(x.shape)} is not {batch} sequences (its "
                             "leading dimension, or a multiple of it in rows); pass one adapter name per sequence "
                             "of the batch")
        return rows // batch

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """(rows,) adapter index of each row of ``x`` (..., in), rows batch-major.

        Raises:
            ValueError: a leading dimension other than the batch's, or rows that are not a whole number per
                sequence.
        """
        key = ("ids", self._per_seq(x), x.device)
        if key not in self._cache:
            self._cache[key] = self.seq_ids.to(x.device).repeat_interleave(key[1])
        return self._cache[key]

    def table_rows(self, device: torch.device) -> torch.Tensor:
        """(batch,) each sequence's row of an ``Epilogue`` table: its adapter index, K for none."""
        key = ("table", device)
        if key not in self._cache:
            self._cache[key] = torch.where(self.seq_ids < 0, self.counts.numel(), self.seq_ids).to(device)
        return self._cache[key]

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """(K,) int32 cumulative rows per adapter (rows grouped; the base-only rows after the last)."""
        key = ("offsets", self._per_seq(x), x.device)
        if key not in self._cache:
            self._cache[key] = (torch.cumsum(self.counts, 0) * key[1]).to(x.device, torch.int32)
        return self._cache[key]


def _check_module(fqn: str, module: nn.Module, names: list, training: bool) -> None:
    if is_embedding_lora(module):
        raise ValueError(f"adapter_batch: {fqn!r} is an adapted embedding; mixed batches are for linear adapters")
    if not isinstance(module, LinearLoRA):
        return
    if "forward" in module.__dict__:  # a hook's forward (accelerate's offload), or an enclosing adapter_batch
        raise ValueError(f"adapter_batch: {fqn!r} has a forward of its own on the instance (a hook such as "
                         "accelerate's device_map / offload, or an adapter_batch block already open); mixed batches "
                         "need the module's class forward: load the model without such hooks, and do not nest blocks")
    if module.lora_merged:
        raise ValueError("adapter_batch: the model's adapter is merged; call unmerge_lora(model) first")
    for name in names:
        holder = holder_of(module, name)
        if training and holder is not None and holder.lora_dropout.p > 0:
            raise ValueError(f"adapter_batch: adapter {name!r} of {fqn!r} has dropout {holder.lora_dropout.p} and "
                             "the model is training; mixed batches train without dropout (set the adapters' dropout "
                             "to 0, or train them one at a time)")


def _stack(module: LinearLoRA, names: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (K, r_max, in), B (K, out, r_max) with each adapter's scale folded in), zeros where it is missing.
    Built from the parameters: under grad mode the stacks carry each adapter's gradient back to it."""
    holders = [holder_of(module, name) for name in names]
    r_max = max((h.lora_settings.dim for h in holders if h is not None), default=1)
    pairs = [padded_adapter(module, h, r_max, dtype) for h in holders]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


def _trained_stacks(module: LinearLoRA, names: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (K, r, in), B (K, out, r), scale) for a training call on the segmented kernels. Where every adapter of the
    batch is on ``module`` with one rank, one scale and one weight dtype (the usual case), the stacks are the
    weights as they are, two ops, and the scale goes to the kernels: the padded, scaled, cast copies ``_stack``
    makes cost ~10 ops and ~10 autograd nodes per adapter per call, host time a short step waits for. The
    kernels cast weights of another dtype (fp32 masters) per tile."""
    holders = [holder_of(module, name) for name in names]
    first = holders[0]
    uniform = first is not None and all(
        h is not None and h.lora_settings.dim == first.lora_settings.dim
        and h.lora_settings.scale == first.lora_settings.scale
        and h.lora_A.weight.dtype == first.lora_A.weight.dtype == h.lora_B.weight.dtype for h in holders)
    if not uniform:
        return *_stack(module, names, dtype), 1.0
    return (torch.stack([h.lora_A.weight for h in holders]), torch.stack([h.lora_B.weight for h in holders]),
            first.lora_settings.scale)


DECODE_KERNELS = ("auto", "gather", "segmented")


def _decode_kernel(choice: str) -> str:
    """``choice`` with ``"auto"`` resolved: ``"gather"``, with one adapter in the batch as with many (on an H100,
    64-sequence decode steps of a 4-layer 8B-shaped model: 1.33x of the base step against the segmented kernel's
    1.42x with one adapter, 1.43x against 18x with 64: the segmented kernel loops over the adapters of a block)."""
    return "gather" if choice == "auto" else choice


def _kernel(rows: _Rows, x: torch.Tensor, grad: bool, decode_kernel: str) -> str | None:
    """The kernel of a call's shrink and expand, or None: the PyTorch loop (no kernels, or a gradient, which the
    grouped ``segmented_lora`` takes where rows are grouped). ``"gather"`` (``kernels/gather_mm.py``) for decode
    (one row per sequence) unless the block asked for ``"segmented"``: a decode block of rows may hold one adapter
    per row, which ``segment_mm`` loops over, where ``gather_mm`` reads each row's adapter directly; else
    ``"segment"`` (prefill: many rows per adapter)."""
    if grad or not use_kernels_for(x):
        return None
    return "gather" if decode_kernel == "gather" and rows._per_seq(x) == 1 else "segment"


def _product(x2: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, kernel: str | None,
             add: torch.Tensor | None = None, fast: bool = True) -> torch.Tensor:
    """(M, N) ``add + x2[i] w_{ids[i]}^T`` for x2 (M, K) (any strides), w (G, N, K): the shrink (w = A) and the
    expand (w = B, added into the base output); rows without an adapter get ``add`` alone (or zero)."""
    if kernel == "gather":
        return gather_mm(x2, w, ids, add=add, fast_launch=fast)
    if kernel == "segment":
        return segment_mm(x2, w, ids, add=add, fast_launch=fast)
    return gathered_product(x2, w, ids, add)


def _fixed(module: LinearLoRA, names: list, dtype: torch.dtype, fixed: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The detached (A, B) for calls without gradient: ``fixed`` (the persistent stacks), else built into it."""
    if not fixed:
        with torch.no_grad():
            fixed.extend(_stack(module, names, dtype))
    return fixed[0], fixed[1]


def _batched_forward(module: LinearLoRA, names: list, dtype: torch.dtype, rows: _Rows, fixed: list,
                     epilogue: Epilogue, decode_kernel: str = "gather",
                     shared: tuple[SharedShrink, int] | None = None):
    """The block's forward of ``module``: ``names[i]`` is the adapter of row id ``i`` (None: zeros); ``fixed``, the
    detached stacks for calls without gradient (the model's persistent ones, ``adapter_stacks``), else built at
    the first such call; ``epilogue``, the DoRA / ``lora_bias`` rows' finish (``mixed_epilogue.py``);
    ``decode_kernel``, the kernel of decode calls (``_kernel``); ``shared``, the q / k / v group whose shrink calls
    without gradient share, and this module's index in it (``fused_shrink.py``)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = module.base_forward(x)
        if not names:  # every sequence runs the base model
            return y
        grad = torch.is_grad_enabled() and (rows.train or x.requires_grad)
        out = _plain_sum(x, y, grad)
        return epilogue(out, rows.table_rows(x.device), grad) if epilogue.active else out

    def _plain_sum(x: torch.Tensor, y: torch.Tensor, grad: bool) -> torch.Tensor:
        """``y`` plus each row's low-rank term (module docstring), (..., N)."""
        ids = rows.of(x)  # (M,)
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        fast = module.lora_settings.kernels.fast_launch
        if grad and use_kernels_for(x) and rows.grouped:
            A, B, scale = _trained_stacks(module, names, dtype)
            return segmented_lora(x2, A, B, y2, ids, rows.offsets(x), scale, fast).view(y.shape)
        A, B = _stack(module, names, dtype) if grad else _fixed(module, names, dtype, fixed)
        kernel = _kernel(rows, x, grad, decode_kernel)
        if shared is None or grad:
            xa = _product(x2, A, ids, kernel, fast=fast)  # (M, r_max)
        else:
            xa = shared[0].shrink(shared[1], x, A, lambda w: _product(x2, w, ids, kernel, fast=fast))
        return _product(xa, B, ids, kernel, add=y2, fast=fast).view(y.shape)

    return forward


def _seq_ids(model: nn.Module, adapters: Sequence, known: list[str]) -> tuple[list[str], torch.Tensor]:
    """(the distinct adapter names in first-seen order, (batch,) their index per sequence, -1 for none)."""
    chosen: list[str] = []
    ids = []
    for a in adapters:
        if a is None or (isinstance(a, int) and a == -1):
            ids.append(-1)
            continue
        if isinstance(a, int):
            if not 0 <= a < len(known):
                raise ValueError(f"adapter_batch: adapter id {a} is out of range; the model's adapters are "
                                 f"{known} (ids 0..{len(known) - 1}, -1 for none)")
            a = known[a]
        if a not in known:
            raise ValueError(f"adapter_batch: {type(model).__name__} has no adapter {a!r}; it has {known}")
        if a not in chosen:
            chosen.append(a)
        ids.append(chosen.index(a))
    return chosen, torch.tensor(ids, dtype=torch.int64)


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapters: Sequence[str | int | None], *,
                  decode_kernel: str = "auto", fuse_qkv: bool = True) -> Iterator[nn.Module]:
    """Run ``model`` with one adapter per sequence of the batch inside the block (see the module docstring).

    Args:
        model: a model with named adapters (``apply_lora_to_linear_modules`` / ``load_adapter(adapter_name=)``).
        adapters: one entry per sequence: an adapter name, its index in ``adapter_names(model)``, or None / -1
            for the base model.
        decode_kernel: the kernel of calls with one row per sequence and no gradient (decode): ``"gather"`` (each
            row reads its own adapter, ``kernels/gather_mm.py``), ``"segmented"`` (the kernel prefill uses), or
            ``"auto"`` (the default: the faster of the two as measured, gather for one adapter and for many); the
            results agree to rounding.
        fuse_qkv: outside training, the adapted ``q_proj`` / ``k_proj`` / ``v_proj`` of one attention block share
            one shrink of their common input (``fused_shrink.py``); False gives each its own, to compare (the
            results agree to rounding).

    Raises:
        ValueError: an unknown name or id, a ``decode_kernel`` other than ``"auto"`` / ``"gather"`` / ``"segmented"``, a
            merged model, embedding / expert adapters, adapters with dropout on a model
            in training mode, a module with a forward of its own on the instance (a hook, or a block already
            open), a call inside ``disable_adapter``, or (at a call inside the block) an input that is not the
            batch's sequences.
    """
    block = Block(model, adapters, decode_kernel=decode_kernel, fuse_qkv=fuse_qkv)
    block.install()
    try:
        yield model
    finally:
        block.remove()


class Block:
    """An ``adapter_batch`` block, built once (the checks, the row ids, the modules' forwards) and installed on
    the model around the calls it serves: ``adapter_batch`` installs it for its ``with``; the recipe's graphed
    mixed step for each training step, so that the row tensors a CUDA graph reads stay the same ones from step
    to step while evaluation and saving in between see the model as it is. Arguments and errors as
    ``adapter_batch``'s."""

    def __init__(self, model: nn.Module, adapters: Sequence[str | int | None], *, decode_kernel: str = "auto",
                 fuse_qkv: bool = True):
        if decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"adapter_batch: decode_kernel={decode_kernel!r}; pass one of {DECODE_KERNELS}")
        known = adapter_names(model)
        names, seq_ids = _seq_ids(model, adapters, known)
        if experts_lora_modules(model):
            raise ValueError("adapter_batch: the model has expert adapters (one adapter on experts per model); mixed "
                             "batches take linear adapters only")
        modules = lora_modules(model)
        check_not_in_disabled_block(modules, "run adapter_batch")
        for fqn, module in modules:
            _check_module(fqn, module, names, model.training)
        named = [(fqn, m) for fqn, m in modules if isinstance(m, LinearLoRA)]
        self.linears = [m for _, m in named]
        slots = None if model.training else stacks_for(model, self.linears, names)  # the model's persistent stacks
        if slots is not None:  # row ids are slots; the stacks' names by slot
            by_slot = {slot: name for name, slot in stacked_slots(model).items()}
            seq_ids = torch.tensor([-1 if i < 0 else slots[names[i]] for i in seq_ids.tolist()], dtype=torch.int64)
            names = [by_slot.get(i) for i in range(stacked_buffers(self.linears[0])[0].shape[0])]
        self.model, self.names, self.training = model, names, model.training
        self.rows = _Rows(seq_ids, len(names), model.training)  # (M,) row ids and offsets: made once per shape
        taken = set(self.rows.seq_ids[self.rows.seq_ids >= 0].tolist())  # the adapters some sequence runs
        self.epilogues = {m: Epilogue(m, [n if i in taken else None for i, n in enumerate(names)])
                          for m in self.linears}
        self.forwards, self.groups, fixed = _forwards(named, names, self.rows, slots is not None, self.epilogues,
                                                      _decode_kernel(decode_kernel), fuse_qkv and not model.training)
        self._built = [] if slots is not None else list(fixed.values())  # stacks the calls build (not the model's)
        self._trainable: list = []

    def install(self) -> None:
        """Put the block's forwards on the modules (and, training, every adapter of the batch trainable).

        Raises:
            ValueError: a module has a forward of its own on the instance (another block, a hook).
        """
        taken = [m for m in self.linears if "forward" in m.__dict__]
        if taken:
            raise ValueError(f"adapter_batch: a {type(taken[0]).__name__} has a forward of its own on the instance "
                             "(an adapter_batch block already open, or a hook); do not nest blocks")
        self._trainable = _train_all(self.model, self.names) if self.training else []
        for m in self.linears:
            m.forward = self.forwards[m]  # the instance's forward, while installed

    def remove(self) -> None:
        """The modules' class forwards and the trainable flags back as they were before :meth:`install`; the
        detached stacks the calls built dropped (the weights may change before the next install)."""
        for m in self.linears:
            m.__dict__.pop("forward", None)
        for group in self.groups:
            group.clear()
        for stacks in self._built:
            stacks.clear()
        for epilogue in self.epilogues.values():
            epilogue.clear()
        for p, flag in self._trainable:
            p.requires_grad_(flag)
        self._trainable = []


def _forwards(named: list[tuple[str, LinearLoRA]], names: list, rows: _Rows, stacked: bool,
              epilogues: dict[LinearLoRA, Epilogue], decode_kernel: str,
              fuse: bool) -> tuple[dict[LinearLoRA, Callable], list[SharedShrink], dict[LinearLoRA, list]]:
    """({module: the block's forward}, the q / k / v groups sharing a shrink, when ``fuse``, {module: the detached
    stacks its calls without gradient read}); ``stacked``: the model's persistent stacks serve those calls;
    ``epilogues``: each module's DoRA / ``lora_bias`` finish."""
    dtypes = {m: m.weight.dtype if m.weight.is_floating_point() else m.lora_A.weight.dtype for _, m in named}
    fixed = {m: list(stacked_buffers(m)) if stacked else [] for _, m in named}
    shared: dict[LinearLoRA, tuple[SharedShrink, int]] = {}
    groups = []
    for members in qkv_groups(named, dtypes) if fuse and names else []:
        group = SharedShrink([partial(lambda m: _fixed(m, names, dtypes[m], fixed[m])[0], m) for m in members])
        shared.update({m: (group, i) for i, m in enumerate(members)})
        groups.append(group)
    forwards = {m: _batched_forward(m, names, dtypes[m], rows, fixed[m], epilogues[m], decode_kernel, shared.get(m))
                for _, m in named}
    return forwards, groups, fixed


def _train_all(model: nn.Module, names: list) -> list:
    """Make every adapter of the batch trainable; returns (parameter, its former flag) to restore."""
    changed = [(p, p.requires_grad) for weights in adapter_weights(model, names).values() for p in weights]
    for p, _ in changed:
        p.requires_grad_(True)
    return changed
