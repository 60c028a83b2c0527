"""LoRA on the experts of a MoE layer, in place: transformers' fused expert parameters.

transformers keeps a MoE layer's experts as 3-D parameters of one module (Qwen3-MoE, Mixtral, OLMoE,
DeepSeek-V3, ...: ``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj`` (E, H, I), or ``(E, in, out)``
where the class says ``is_transposed``). A targeted parameter ``p`` gets per-expert adapters beside it::

    lora_A[p]  (E, r, in)        lora_B[p]  (E, out, r)
    y_e = x_e W_e^T + s (x_e A_e^T) B_e^T        for the rows x_e routed to expert e

and the module's ``__class__`` becomes a subclass of its own class whose forward sorts the token-expert
pairs by expert and runs each projection as grouped products (``grouped_mm``), the adapter's two beside
the base's. Parameter names do not move: ``mlp.experts.gate_up_proj`` stays where it was; the adapters
are ``mlp.experts.lora_A.gate_up_proj`` and ``mlp.experts.lora_B.gate_up_proj``.

Supported: classes built with transformers' ``use_experts_implementation`` (they say ``has_gate``,
``has_bias``, ``is_transposed``); not under expert parallelism. The routing, the gate and any shared
experts are left as they are (shared experts are plain linears and take plain LoRA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .config import LoraSettings
from .grouped_linear import grouped_rows_lora
from .grouped_mm import group_offsets

__all__ = ["ExpertsLoRA", "EXPERT_PARAMS", "is_experts_module", "expert_params", "patch_experts_module",
           "experts_lora_modules", "delta", "folded", "fold_experts", "check_fold_finite", "unpatch_experts"]

EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")  # transformers' names of fused expert weights


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module (``use_experts_implementation``) with 3-D expert weights."""
    return all(hasattr(module, a) for a in ("num_experts", "has_gate", "is_transposed")) and bool(expert_params(module))


def expert_params(module: nn.Module) -> list[str]:
    """The module's 3-D expert weights of :data:`EXPERT_PARAMS`, in registration order (PEFT nests its wrappers
    in this order: the file keys of the first have the most ``.base_layer``)."""
    return [n for n, p in module.named_parameters(recurse=False) if n in EXPERT_PARAMS and p.dim() == 3]


def _in_out(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(E, in, out) of expert weight ``name``: stored (E, out, in), or (E, in, out) if ``is_transposed``."""
    e, a, b = getattr(module, name).shape
    return (e, a, b) if module.is_transposed else (e, b, a)


class ExpertsLoRA(nn.Module):
    """Mixin of the LoRA experts classes (``type(module)`` is a subclass of this and of the experts class).

    Attributes (beside the experts class's own):
        lora_A, lora_B: ``nn.ParameterDict`` keyed by the adapted weight's name: (E, r, in) and (E, out, r).
        lora_settings: {weight name: its ``LoraSettings`` (rank, alpha, rsLoRA); the scale is ``.scale``}.
        lora_merged: whether ``s B_e A_e`` is folded into the weights (the forward then skips the adapters).
        lora_use_triton: the adapters run in the segmented Triton kernels (``kernels/segmented_lora.py``) where
            they run (CUDA, or the CPU interpreter); else in grouped products of PyTorch.
    """

    lora_A: nn.ParameterDict
    lora_B: nn.ParameterDict
    lora_settings: dict
    lora_merged: bool
    lora_use_triton: bool

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """hidden_states (T, H), top_k_index / top_k_weights (T, k) -> (T, H), as the experts class computes it."""
        tokens, hidden = hidden_states.shape
        k = top_k_index.shape[-1]
        expert_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)  # (S,), S = T * k pairs
        offsets = group_offsets(expert_ids, self.num_experts)  # (E,) int32
        x = hidden_states[perm // k]  # (S, H) sorted by expert
        h = self.lora_project("gate_up_proj" if self.has_gate else "up_proj", x, offsets, expert_ids)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # (S, I)
        out = self.lora_project("down_proj", h, offsets, expert_ids)  # (S, H)
        if getattr(self, "has_post_expert_norm", False):
            out = self.post_expert_norm(out)
        out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return out[inverse].view(tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)

    def lora_project(self, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor):
        """x (S, in) sorted by expert -> (S, out): the base weight ``name``, plus its adapter if it has one."""
        bias = getattr(self, f"{name}_bias") if self.has_bias else None
        adapted = name in self.lora_A and not self.lora_merged
        A, B = (self.lora_A[name], self.lora_B[name]) if adapted else (None, None)  # (E, r, in), (E, out, r)
        scale = self.lora_settings[name].scale if adapted else 0.0
        fast = self.lora_settings[name].kernels.fast_launch if adapted else True
        return grouped_rows_lora(x, getattr(self, name), A, B, scale, offsets, expert_ids, bias,
                                 self.lora_use_triton, transposed=self.is_transposed, fast_launch=fast)

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.lora_A[n].shape[1]}, scale={self.lora_settings[n].scale:g}" for n in self.lora_A]
        return "lora(" + "; ".join(parts) + (", merged" if self.lora_merged else "") + ")"


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if issubclass(cls, ExpertsLoRA):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (ExpertsLoRA, cls), {"__module__": cls.__module__})
    return _CLASSES[cls]


def patch_experts_module(module: nn.Module, params: Sequence[str], settings: LoraSettings,
                         use_triton: bool = True) -> nn.Module:
    """Give the experts ``params`` of ``module`` per-expert adapters of ``settings`` (its ``dim``, ``alpha``,
    ``use_rslora``, ``lora_dtype``; dropout, DoRA and ``lora_bias`` are refused), in place.

    A (E, r, in) is initialised as PEFT initialises its ``lora_A`` (Kaiming-uniform, bound 1/sqrt(in)), B to
    zeros, so the patched module computes what it did. The base weights are frozen.

    Raises:
        TypeError: ``module`` is not a transformers experts module (see :func:`is_experts_module`).
        ValueError: a name that is not one of its expert weights, one adapted already, settings with dropout,
            DoRA or ``lora_bias`` (HF PEFT's ``target_parameters`` adapters have none), or a module under expert
            parallelism.
    """
    if not is_experts_module(module):
        raise TypeError(f"{type(module).__name__} is not a transformers experts module (3-D {EXPERT_PARAMS} weights, "
                        "built with use_experts_implementation); adapt its linears with target_modules instead")
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(f"{type(module).__name__} runs under expert parallelism, which LoRA on experts does not "
                         "support; load the model without it")
    have = expert_params(module)
    for name in params:
        if name not in have:
            raise ValueError(f"{name!r} is not an expert weight of {type(module).__name__}; it has {have}")
        if isinstance(module, ExpertsLoRA) and name in module.lora_A:
            raise ValueError(f"the expert weight {name!r} has an adapter already; remove_lora(model) first")
    if settings.dropout or settings.use_dora or settings.lora_bias:
        raise ValueError(f"expert weights take plain LoRA only (HF PEFT's target_parameters adapters have no dropout, "
                         f"DoRA or lora_bias); got {settings}")
    if not isinstance(module, ExpertsLoRA):
        module.lora_A, module.lora_B, module.lora_settings, module.lora_merged = nn.ParameterDict(), nn.ParameterDict(), {}, False
        module.lora_use_triton = use_triton
        module.__class__ = _lora_class(type(module))
    for name in params:
        weight = getattr(module, name)
        weight.requires_grad_(False)
        experts, fan_in, fan_out = _in_out(module, name)
        kw = dict(device=weight.device, dtype=settings.lora_dtype or weight.dtype)
        module.lora_A[name] = nn.Parameter(torch.empty(experts, settings.dim, fan_in, **kw))
        module.lora_B[name] = nn.Parameter(torch.zeros(experts, fan_out, settings.dim, **kw))
        if weight.device.type != "meta":
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) of an (r*E, in) weight
            nn.init.uniform_(module.lora_A[name], -bound, bound)
        module.lora_settings[name] = settings
    return module


def experts_lora_modules(model: nn.Module) -> list[tuple[str, ExpertsLoRA]]:
    """(fqn, module) of every experts module of ``model`` with adapters."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ExpertsLoRA)]


def delta(module: ExpertsLoRA, name: str, expert: int) -> torch.Tensor:
    """``s B_e A_e`` of one expert, laid out as its weight slice ((out, in), or (in, out) if transposed), in fp32.
    One expert at a time: a whole stack in fp32 would be gigabytes at Mixtral's sizes."""
    d = (module.lora_B[name][expert].float() @ module.lora_A[name][expert].float()) * module.lora_settings[name].scale
    return d.T if module.is_transposed else d


def folded(module: ExpertsLoRA, name: str, expert: int, sign: float) -> torch.Tensor:
    """Expert ``expert``'s weight slice with its adapter added (``sign`` 1) or taken out (-1), in its dtype."""
    w = getattr(module, name)[expert]
    return (w.float() + sign * delta(module, name, expert)).to(w.dtype)


@torch.no_grad()
def fold_experts(module: ExpertsLoRA, sign: float) -> None:
    """Add (``sign`` = 1: merge) or subtract (-1: unmerge) every adapter's delta into its weight, expert by expert."""
    for name in module.lora_A:
        weight = getattr(module, name)
        for e in range(weight.shape[0]):
            weight[e].copy_(folded(module, name, e, sign))
    module.lora_merged = sign > 0


def unpatch_experts(module: ExpertsLoRA) -> None:
    """The experts module back to its own class, its adapters gone (weights as they are now)."""
    for attr in ("lora_A", "lora_B", "lora_settings", "lora_merged", "lora_use_triton"):
        delattr(module, attr)
    module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, ExpertsLoRA))


def check_fold_finite(modules: list[tuple[str, ExpertsLoRA]], sign: float) -> None:
    """Raise before anything is written if merging (``sign`` 1) or unmerging (-1) would leave NaN/Inf in a weight.

    Raises:
        ValueError: naming the module and the weight; no weight was changed.
    """
    verb = "merge" if sign > 0 else "unmerge"
    for fqn, module in modules:
        for name in module.lora_A:
            weight = getattr(module, name)
            if not all(torch.isfinite(folded(module, name, e, sign)).all() for e in range(weight.shape[0])):
                raise ValueError(f"cannot {verb} the adapter of {fqn}.{name}: the result holds NaN/Inf (a non-finite "
                                 f"adapter, or one too large for {weight.dtype}); no weight was changed")
