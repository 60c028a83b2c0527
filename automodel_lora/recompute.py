"""Recompute the input of an adapted ``down_proj`` in backward instead of keeping it.

A frozen linear needs nothing of its input for backward (``dx = dy W``); a LoRA linear needs its
input ``x`` for ``dA = s (dy B)^T x``. In a gated MLP (``down(act(gate(x)) * up(x))``, Llama and its
kin) that input ``h = act(g) * u`` is ``[tokens, intermediate]``, the largest activation of the
layer, and the frozen model never keeps it. Autograd keeps ``g`` and ``u`` anyway (for the backward
of ``act`` and of the product), so ``h`` can be made again from them, bit for bit, when
``down_proj``'s backward asks for it: one elementwise pass in backward instead of
``tokens * intermediate`` bytes held from forward to backward (4 x 117 MB in the 4-layer benchmark
model, `benchmarks/NOTES.md`).

How: the gated MLP's class is swapped in place (as the linears' are) for a subclass whose forward
runs ``down_proj`` inside a ``saved_tensors_hooks`` context that stores, for any saved tensor that
*is* ``h`` (or a contiguous view of it), a recipe instead of the tensor. Nothing else changes: the
same kernels run, every other saved tensor is stored as before, parameters and FQNs are untouched.
The forward falls back to the original one (keeping ``h``) where the recipe would not hold:
under ``torch.compile`` (its partitioner makes its own recompute choices), when another
saved-tensor hook is active (activation checkpointing or offloading, which already decide what to
keep), or when ``g`` / ``u`` do not require grad (autograd would not keep them, so the recipe would
keep two tensors to save one).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

# Class names of gated MLPs whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``
# (transformers' modeling code). Only these are patched: the recompute must reproduce the forward.
GATED_MLP_CLASSES = frozenset({
    "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "OlmoMLP", "Olmo2MLP",
    "GraniteMLP",
})

_RECOMPUTE_CLASSES: dict[type, type] = {}


class _RecomputedInput:
    """What is saved in place of ``h``: the recipe ``act(g) * u`` and the view to return.

    ``g`` and ``u`` are the tensors autograd already keeps for the backward of ``act`` and of the
    product; their versions are recorded so that an in-place change after forward is an error, as
    it would be for a tensor autograd saved itself.
    """

    __slots__ = ("act", "g", "u", "versions", "shape", "value")

    def __init__(self, act, g: torch.Tensor, u: torch.Tensor, shape: torch.Size):
        self.act, self.g, self.u = act, g, u
        self.versions = (g._version, u._version)
        self.shape = shape
        self.value = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            if (self.g._version, self.u._version) != self.versions:
                raise RuntimeError(
                    "the gate / up projection outputs that down_proj's input is recomputed from were modified "
                    "in place after the forward pass; recompute_mlp_input needs them unchanged (set "
                    "PeftConfig.recompute_mlp_input=False to keep down_proj's input instead)"
                )
            with torch.no_grad():
                self.value = (self.act(self.g) * self.u).reshape(self.shape)
        return self.value


def _views_whole(t: torch.Tensor, h: torch.Tensor) -> bool:
    """True if ``t`` is ``h`` or a contiguous view of all of it (the flattened input a kernel saves)."""
    if t is h:
        return True
    return (
        t.dtype == h.dtype
        and t.device == h.device
        and t.numel() == h.numel()
        and t.is_contiguous()
        and t.untyped_storage().data_ptr() == h.untyped_storage().data_ptr()
        and t.storage_offset() == h.storage_offset()
    )


class _SaveRecipeFor(torch.autograd.graph.saved_tensors_hooks):
    """Inside it, a saved tensor that is ``h = act(g) * u`` is stored as a recipe, any other as itself."""

    def __init__(self, h: torch.Tensor, act, g: torch.Tensor, u: torch.Tensor):
        recipes: dict[torch.Size, _RecomputedInput] = {}
        # Every saved tensor keeps these hooks until its backward: they must not keep h alive.
        h_ref = weakref.ref(h)

        def pack(t: torch.Tensor):
            h = h_ref()
            if h is None or not _views_whole(t, h):
                return t
            if t.shape not in recipes:  # one recomputation per shape, shared by every node that saved it
                recipes[t.shape] = _RecomputedInput(act, g, u, t.shape)
            return recipes[t.shape]

        def unpack(saved):
            return saved.get() if isinstance(saved, _RecomputedInput) else saved

        super().__init__(pack, unpack)


def _can_recompute(g: torch.Tensor, u: torch.Tensor) -> bool:
    return (
        torch.is_grad_enabled()
        and g.requires_grad
        and u.requires_grad
        and not torch.compiler.is_compiling()
        and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    )


class GatedMLPRecompute(nn.Module):
    """Mixin for a gated MLP class: same forward, ``down_proj``'s input recomputed in backward.

    Built per MLP class by `recompute_mlp_inputs` (``type(name, (GatedMLPRecompute, cls), ...)``);
    ``_recompute_base_cls`` is the original class, restored by `restore_mlp_classes`.
    """

    _recompute_base_cls: type[nn.Module] = nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_proj
        if getattr(down, "lora_merged", True):  # no adapter (removed) or merged: nothing saves h
            return self._recompute_base_cls.forward(self, x)
        g = self.gate_proj(x)  # (..., intermediate)
        u = self.up_proj(x)  # (..., intermediate)
        h = self.act_fn(g) * u  # (..., intermediate): the forward's own h, bit for bit
        if not _can_recompute(g, u):
            return down(h)
        with _SaveRecipeFor(h, self.act_fn, g, u):
            return down(h)


def _recompute_class_for(cls: type) -> type:
    """The recompute subclass of ``cls``, built once and registered here for pickle (as `lora` does)."""
    if cls not in _RECOMPUTE_CLASSES:
        name = f"Recompute_{cls.__module__.replace('.', '_')}_{cls.__name__}"
        sub = type(name, (GatedMLPRecompute, cls), {"_recompute_base_cls": cls, "__module__": __name__})
        sub.__qualname__ = name
        globals()[name] = sub
        _RECOMPUTE_CLASSES[cls] = sub
    return _RECOMPUTE_CLASSES[cls]


def _is_gated_mlp(module: nn.Module) -> bool:
    return type(module).__name__ in GATED_MLP_CLASSES and all(
        isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj")
    ) and callable(getattr(module, "act_fn", None))


def recompute_mlp_inputs(model: nn.Module) -> int:
    """Swap, in place, every gated MLP of `model` whose ``down_proj`` has an adapter for its recompute subclass.

    Gated MLPs are the classes in `GATED_MLP_CLASSES` (their forward is
    ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``); others are left alone. Results are the
    same bit for bit; backward makes ``down_proj``'s input again instead of keeping it.

    Returns:
        The number of MLPs switched (already switched ones are not counted again).
    """
    from .lora import is_lora_module

    count = 0
    for module in model.modules():
        if isinstance(module, GatedMLPRecompute) or not _is_gated_mlp(module):
            continue
        if is_lora_module(module.down_proj):
            module.__class__ = _recompute_class_for(type(module))
            count += 1
    return count


def restore_mlp_classes(model: nn.Module) -> int:
    """Give every MLP switched by `recompute_mlp_inputs` its original class back. Returns the count."""
    switched = [m for m in model.modules() if isinstance(m, GatedMLPRecompute)]
    for module in switched:
        module.__class__ = module._recompute_base_cls
    return len(switched)
