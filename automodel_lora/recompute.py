"""Recompute the input of an adapted ``down_proj`` in backward instead of keeping it.

A frozen linear needs nothing of its input for backward (``dx = dy W``); a LoRA linear needs its
input ``x`` for ``dA = s (dy B)^T x``. In a gated MLP (``down(act(gate(x)) * up(x))``, Llama and its
kin) that input ``h = act(g) * u`` is ``[tokens, intermediate]``, the largest activation of the
layer, and the frozen model never keeps it. Autograd keeps ``g`` and ``u`` anyway (for the backward
of ``act`` and of the product), so ``h`` can be made again from them, bit for bit, when
``down_proj``'s backward asks for it: one elementwise pass in backward instead of
``tokens * intermediate`` bytes held from forward to backward (112 MiB per layer at 4096 tokens and
an intermediate size of 14336 in bf16).

How: the gated MLP's class is swapped in place (as the linears' are) for a subclass whose forward
runs ``down_proj`` inside a ``saved_tensors_hooks`` context that stores, for any saved tensor that
*is* ``h`` (or a contiguous view of all of it, unmodified), a recipe instead of the tensor. Nothing
else changes: the same kernels run, every other saved tensor is stored as before, parameters and
FQNs are untouched.

Which modules: those whose class's ``forward`` compiles to exactly
``return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))`` (the bytecode is
compared, so Llama, Mistral, Qwen2/3 (and their MoE experts), Gemma 1-3, OLMo, Granite, Cohere,
SmolLM3, ... match, and a class of the same name with another forward does not), with an ``act_fn``
whose backward keeps its input (SiLU and the GELUs; a ReLU keeps its output, so there ``g`` would be
kept for the recipe alone and nothing saved).

The product itself: with SiLU or the tanh GELU (`fused_activation`) it is `kernels.silu_mul.silu_mul`,
which keeps only ``g`` and ``u`` for backward, where autograd on ``act(g) * u`` keeps ``act(g)`` as well
(a third ``tokens * intermediate`` tensor: 64 MiB per layer of Llama-3.2-1B at 4096 tokens in bf16). Its
kernels run where ``down_proj``'s do (a `FusedLinearLoRA`, ``use_triton=True``), its PyTorch math
(bit for bit ``act(g) * u``) elsewhere; the recipe makes ``h`` with the same op as the forward did, so
the recomputed ``h`` is the forward's bit for bit either way. It is used where autograd records the
product (grad mode on, ``g`` or ``u`` requiring grad) with ``g``, ``u`` contiguous, of one shape and
dtype; everywhere else (any other activation, an ``act_fn`` with forward hooks, no grad, a mismatch) the
product is ``act_fn(g) * u`` as the original forward computes it. Under ``torch.compile`` and ``torch.func``
transforms `silu_mul` is that plain product too.

The forward keeps ``h`` as before where the recipe would not hold: under ``torch.compile`` (its
partitioner makes its own recompute choices), under another saved-tensor hook (activation
checkpointing or offloading, which already decide what to keep) or where saved-tensor hooks are
disabled (``torch.func`` transforms), when ``g`` / ``u`` do not require grad (autograd would not keep
them), for a non-contiguous ``h``, and on torch builds without the hook-stack query (before 2.8).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

from .kernels.silu_mul import DTYPES as FUSED_DTYPES
from .kernels.silu_mul import silu_mul
from .lora import FusedLinearLoRA, is_lora_module
from .patching import swapped_class, swapped_reduce

# Activations whose backward keeps their input (so autograd keeps g anyway): by class name, torch's
# and transformers' (ACT2FN) modules.
INPUT_KEEPING_ACTIVATIONS = frozenset({
    "SiLU", "SiLUActivation", "GELU", "GELUActivation", "GELUTanh", "PytorchGELUTanh", "NewGELUActivation",
    "FastGELUActivation", "QuickGELUActivation",
})


# The activations `silu_mul` computes, by exact class (a subclass may change the forward): torch's and
# transformers' (ACT2FN "silu" / "swish", "gelu_pytorch_tanh"). nn.GELU and transformers' GELUTanh are
# checked further in `fused_activation` (their tanh variant only, and GELUTanh's F.gelu path).
_SILU_CLASSES = {"torch.nn.modules.activation.SiLU", "transformers.activations.SiLUActivation"}
_GELU_TANH_CLASSES = {"torch.nn.modules.activation.GELU", "transformers.activations.GELUTanh",
                      "transformers.activations.PytorchGELUTanh"}


def fused_activation(act: nn.Module) -> str | None:
    """The `silu_mul` activation (``"silu"`` or ``"gelu_tanh"``) that computes ``act``, or None for any other
    activation (the MLP then keeps ``act_fn(g) * u``)."""
    cls = type(act)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if "forward" in act.__dict__ or act._forward_hooks or act._forward_pre_hooks:  # a replaced forward, or hooks
        return None  # that expect act_fn to be called
    if name in _SILU_CLASSES:
        return "silu"
    if name not in _GELU_TANH_CLASSES:
        return None
    if cls is nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else None
    fn = getattr(act, "act", None)  # GELUTanh: a partial of F.gelu, or its Python formula (other bits)
    if fn is None or (isinstance(fn, functools.partial) and fn.func is nn.functional.gelu
                      and not fn.args and fn.keywords == {"approximate": "tanh"}):
        return "gelu_tanh"
    return None


def _gated_mlp_forward(self, x):  # the forward a module must have, compared by bytecode
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _same_code(fn, ref) -> bool:
    code, want = getattr(fn, "__code__", None), ref.__code__
    return code is not None and all(
        getattr(code, attr) == getattr(want, attr) for attr in ("co_code", "co_names", "co_consts", "co_argcount")
    )


def _act_times(act: nn.Module, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``act(g) * u`` as the original forward makes it, the product written into ``act(g)``'s buffer where
    that gives the same bits (no second tensor of h's size)."""
    h = act(g)
    if h.dtype == torch.result_type(h, u) and h.shape == u.shape and not _shares(h, g):
        return h.mul_(u)
    return h * u


class _RecomputedInput:
    """What is saved in place of ``h``: the recipe ``remake(g, u)`` (the op the forward made ``h`` with),
    replayed under the forward's autocast state, reshaped to the saved view.

    ``g`` and ``u`` are the tensors autograd already keeps for the backward of the product (`silu_mul`'s,
    or ``act``'s and the multiplication's); their versions are recorded so that an in-place change after
    forward is an error, as it would be for a tensor autograd saved itself.
    """

    __slots__ = ("remake", "g", "u", "versions", "shape", "dtype", "autocast", "value")

    def __init__(self, remake, g: torch.Tensor, u: torch.Tensor, saved: torch.Tensor, autocast: tuple):
        self.remake, self.g, self.u = remake, g, u
        self.versions = (g._version, u._version)
        self.shape, self.dtype = saved.shape, saved.dtype
        self.autocast = autocast  # (device type, enabled, dtype) of the forward
        self.value = None

    def get(self) -> torch.Tensor:
        if self.value is None:
            if (self.g._version, self.u._version) != self.versions:
                raise RuntimeError(
                    "the gate / up projection outputs that down_proj's input is recomputed from were modified "
                    "in place after the forward pass; recompute_mlp_input needs them unchanged (set "
                    "PeftConfig.recompute_mlp_input=False to keep down_proj's input instead)"
                )
            device_type, enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                h = self.remake(self.g, self.u)
            if h.dtype != self.dtype or h.numel() != self.shape.numel():
                raise RuntimeError(
                    f"down_proj's input recomputed in backward is {h.dtype} {tuple(h.shape)}, but the forward saved "
                    f"{self.dtype} {tuple(self.shape)}; set PeftConfig.recompute_mlp_input=False for this model"
                )
            self.value = h.reshape(self.shape)
        return self.value


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _views_whole(t: torch.Tensor, h: torch.Tensor, h_version: int) -> bool:
    """True if ``t`` is the contiguous ``h`` or a contiguous view of all of it (the flattened input a
    kernel saves), unchanged since the recipe was made (a view shares ``h``'s version counter)."""
    if t._version != h_version:
        return False
    if t is h:
        return True
    return (
        t.dtype == h.dtype
        and t.device == h.device
        and t.numel() == h.numel()
        and t.is_contiguous()
        and _shares(t, h)
        and t.storage_offset() == h.storage_offset()
    )


class _SaveRecipeFor(torch.autograd.graph.saved_tensors_hooks):
    """Inside it, a saved tensor that is ``h = remake(g, u)`` is stored as a recipe, any other as itself."""

    def __init__(self, h: torch.Tensor, remake, g: torch.Tensor, u: torch.Tensor):
        recipes: dict[torch.Size, _RecomputedInput] = {}
        # Every saved tensor keeps these hooks until its backward: they must not keep h alive.
        h_ref, h_version = weakref.ref(h), h._version
        device_type = h.device.type
        autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))

        def pack(t: torch.Tensor):
            h = h_ref()
            if h is None or not _views_whole(t, h, h_version):
                return t
            if t.shape not in recipes:  # one recomputation per shape, shared by every node that saved it
                recipes[t.shape] = _RecomputedInput(remake, g, u, t, autocast)
            return recipes[t.shape]

        def unpack(saved):
            return saved.get() if isinstance(saved, _RecomputedInput) else saved

        super().__init__(pack, unpack)


# What tells whether saved-tensor hooks are free to use, looked up once (None where this torch has no
# such query: the hook-stack query arrived in torch 2.8).
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_HOOKS_ENABLED = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
_FUNCTORCH_LEVEL = getattr(torch._C._functorch, "peek_interpreter_stack", None)


def _hooks_are_free() -> bool:
    """No other saved-tensor hook is active and hooks are allowed (False where torch cannot tell)."""
    if _TOP_HOOKS is None or _HOOKS_ENABLED is None or not _HOOKS_ENABLED():
        return False
    return _TOP_HOOKS(False) is None and (_FUNCTORCH_LEVEL is None or _FUNCTORCH_LEVEL() is None)


def _fusable(g: torch.Tensor, u: torch.Tensor) -> bool:
    """Autograd records the product, and `silu_mul` can save ``g`` and ``u`` themselves (contiguous: no copy,
    so the recipe shares them)."""
    return (
        torch.is_grad_enabled()
        and (g.requires_grad or u.requires_grad)
        and g.shape == u.shape
        and g.dtype == u.dtype
        and g.dtype in FUSED_DTYPES
        and g.device == u.device
        and g.is_contiguous()
        and u.is_contiguous()
    )


def _can_recompute(h: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> bool:
    return (
        torch.is_grad_enabled()
        and g.requires_grad
        and u.requires_grad
        and not torch.compiler.is_compiling()
        and h.is_contiguous()
        and _hooks_are_free()
    )


class GatedMLPRecompute(nn.Module):
    """Mixin for a gated MLP class: same forward, ``down_proj``'s input recomputed in backward.

    Built per MLP class by `recompute_mlp_inputs` (``type(name, (GatedMLPRecompute, cls), ...)``);
    ``_recompute_base_cls`` is the original class, restored by `restore_mlp_classes`.
    """

    _recompute_base_cls: type[nn.Module] = nn.Module

    def __reduce_ex__(self, protocol):
        """Pickle by the (mixin, original class) pair: a fresh process builds the class again."""
        return swapped_reduce(self, "_recompute_base_cls")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_proj
        if getattr(down, "lora_merged", True):  # no adapter (removed) or merged: nothing saves h
            return self._recompute_base_cls.forward(self, x)
        g = self.gate_proj(x)  # (..., intermediate)
        u = self.up_proj(x)  # (..., intermediate)
        activation = fused_activation(self.act_fn)
        if activation is not None and _fusable(g, u):  # saves g and u only, not act(g)
            remake = functools.partial(silu_mul, activation=activation, use_triton=isinstance(down, FusedLinearLoRA),
                                       fast_launch=down.lora_settings.kernels.fast_launch)
            h = remake(g, u)  # (..., intermediate)
        else:
            remake = functools.partial(_act_times, self.act_fn)
            h = self.act_fn(g) * u  # (..., intermediate): the original forward's h and graph
        if not _can_recompute(h, g, u):
            return down(h)
        with _SaveRecipeFor(h, remake, g, u):
            return down(h)


def _recompute_class_for(cls: type) -> type:
    """The class a gated MLP of class ``cls`` is switched to: a subclass of (`GatedMLPRecompute`, ``cls``)."""
    return swapped_class(GatedMLPRecompute, cls, "_recompute_base_cls")


def is_gated_mlp(module: nn.Module) -> bool:
    """True for a module whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (compared
    by bytecode) with an ``act_fn`` whose backward keeps its input (`INPUT_KEEPING_ACTIVATIONS`)."""
    return (
        _same_code(type(module).forward, _gated_mlp_forward)
        and all(isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj"))
        and type(getattr(module, "act_fn", None)).__name__ in INPUT_KEEPING_ACTIVATIONS
    )


def recompute_mlp_inputs(model: nn.Module) -> int:
    """Swap, in place, every gated MLP of `model` whose ``down_proj`` has an adapter for its recompute subclass.

    Gated MLPs are those `is_gated_mlp` accepts; others are left alone. Results are the same bit for
    bit; backward makes ``down_proj``'s input again instead of keeping it.

    Returns:
        The number of MLPs switched (already switched ones are not counted again).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, GatedMLPRecompute) or not is_gated_mlp(module):
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
