"""Whole-model operations on adapters: apply, initialise, merge, unmerge, remove, set kernel options.

This is the injection layer (HF PEFT's `model.py` role): it walks a model, picks modules with
`ModuleMatcher`, patches them with the layer of `automodel_lora.lora`, and switches gated MLPs with
`automodel_lora.recompute`. Imports run one way: config -> lora -> recompute -> injection.

Merging is all-or-nothing: every merged (or unmerged) weight is computed and checked before any
base weight is written, so an error leaves every base weight as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .adapter_bias import check_bias_finite, check_bias_mergeable, fold_bias_, folded_bias
from .adapter_slots import (
    ADAPTER_PARTS,
    DEFAULT_ADAPTER_NAME,
    INACTIVE,
    adapter_names,
    adapter_part_ids,
    attach_adapter,
    check_adapter_name,
    check_not_in_disabled_block,
    holder_of,
    holders,
)
from .config import PeftConfig
from .dora import MAGNITUDE, MERGE_NORM, dora_folded, magnitude_of, record_merge_norm, reset_magnitude_
from .embedding_lora import check_embedding_selection, init_holder, is_embedding, unpatch_parameters
from .experts_lora import check_fold_finite, experts_lora_modules, fold_experts, unpatch_experts
from .experts_targets import apply_lora_to_experts, check_experts_adaptable, select_expert_params
from .kernels.options import KernelOptions
from .lora import LORA_ATTRIBUTES, LinearLoRA, is_lora_module, lora_modules
from .matcher import ModuleMatcher, is_adaptable, is_plain_name, name_matches, near_misses, output_head_names
from .modules_to_save import mark_modules_to_save, select_modules_to_save, unmark_modules_to_save
from .quant import is_quantized_linear
from .recompute import recompute_mlp_inputs, restore_mlp_classes


def apply_lora_to_linear_modules(model: nn.Module, peft_config: PeftConfig | dict,
                                 adapter_name: str = DEFAULT_ADAPTER_NAME) -> int:
    """Freeze `model` and patch, in place, every linear module that `peft_config` selects.

    Every patched module gets `peft_config.settings_for(fqn)` (`lora_settings()` with `rank_pattern` /
    `alpha_pattern` applied; kernel options included) and the
    `FusedLinearLoRA` path if `peft_config.use_triton`, else the `LinearLoRA` reference.

    On a model that has adapters already, this adds another one named `adapter_name` beside them (HF PEFT's
    `add_adapter`): initialised, frozen and not in use until `set_adapter(model, adapter_name)`; the model's
    own adapters and trainable parameters are left as they are (see `automodel_lora.adapter_slots`).

    Args:
        model: any `nn.Module` (a model built on the meta device too).
        peft_config: a `PeftConfig`, or a dict for `PeftConfig.from_dict`.
        adapter_name: the adapter's name (HF PEFT's default `"default"`).

    Modules named by `peft_config.modules_to_save` are marked and left trainable (everything else is
    frozen), so `save_adapter` writes them in full (see `automodel_lora.modules_to_save`).

    Expert weights of MoE layers (`peft_config.target_parameters`, `match_all_experts`) get per-expert
    adapters in place (see `automodel_lora.experts_lora`), in the first adapter only.

    Returns:
        The number of modules patched, plus the number of expert weights adapted.

    Raises:
        ValueError: the config selects nothing (the message lists linear modules
            that exist), a `target_modules` entry matches no linear module (unless
            `allow_unmatched_targets`; the message names the entry and its nearest
            real names), a plain target names a non-linear module, the model already has an adapter named
            `adapter_name` (or is merged), `adapter_name` is not a usable name, or a `modules_to_save` entry
            matches nothing, names an adapted module or a tied weight (or comes with a second adapter). The
            model is left untouched.
    """
    cfg = PeftConfig.from_dict(peft_config) if isinstance(peft_config, dict) else peft_config
    first, in_use = _check_new_adapter(model, check_adapter_name(adapter_name), cfg)
    matcher = ModuleMatcher(cfg.target_modules, cfg.exclude_modules, cfg.match_all_linear, output_head_names(model),
                            cfg.layers_to_transform, cfg.layers_pattern)
    parts = adapter_part_ids(model)
    linear_names = [n for n, m in model.named_modules() if is_adaptable(m) and id(m) not in parts]
    if not cfg.allow_unmatched_targets:
        _check_every_target_matches(model, cfg, linear_names)
    selected = []
    for name, module in model.named_modules():
        if id(module) in parts or not matcher.match(module, name):
            continue
        if is_lora_module(module) and holder_of(module, adapter_name) is not None:
            raise ValueError(
                f"module {name!r} already has a LoRA adapter named {adapter_name!r}; call remove_lora(model) (or "
                f"delete_adapter(model, {adapter_name!r})) before re-applying, or pass another adapter_name= to add "
                "a second adapter beside it"
            )
        selected.append((name, module))
    experts = select_expert_params(model, cfg) if cfg.adapts_experts else {}
    if experts and not first:
        raise ValueError(f"expert weights in a second adapter ({adapter_name!r}): the experts of a model take one "
                         "adapter; add this one without target_parameters / match_all_experts")
    check_experts_adaptable(model, experts)
    if not selected and not experts:
        raise ValueError(
            f"PeftConfig(target_modules={cfg.target_modules!r}, exclude_modules={cfg.exclude_modules!r}, "
            f"match_all_linear={cfg.match_all_linear}{_layer_selection(cfg)}) matches no linear module of "
            f"{type(model).__name__} (HF PEFT: \"Target modules {cfg.target_modules} not found in the base model\"). "
            f"It has {len(linear_names)} linear modules, e.g. {linear_names[:8]}; "
            "a plain name matches a FQN or its dotted suffix ('q_proj'), a glob the whole FQN ('*.mlp.*')"
        )
    check_embedding_selection(selected, cfg.lora_settings(), adapter_name, first)
    to_save = select_modules_to_save(model, cfg.modules_to_save, [n for n, _ in selected], cfg.allow_unmatched_targets)
    if first:  # later adapters leave what is trainable as it is
        model.requires_grad_(False)
    settings = cfg.lora_settings()
    for name, module in selected:  # an adapter added beside the one in use is not in use
        attach_adapter(module, adapter_name, cfg.settings_for(name, settings), cfg.use_triton, in_use)
    mark_modules_to_save(to_save)
    if cfg.recompute_mlp_input:
        recompute_mlp_inputs(model)
    return len(selected) + apply_lora_to_experts(model, cfg, experts)


def _check_new_adapter(model: nn.Module, adapter_name: str, cfg: PeftConfig) -> tuple[bool, bool]:
    """`(first, in_use)`: whether `adapter_name` is the model's first adapter, and whether modules that get it
    now compute with it (it is the adapter in use, or the first one), after checking it may be added."""
    existing = adapter_names(model)
    check_not_in_disabled_block(lora_modules(model), "add adapters")
    if existing and any(m.lora_merged for _, m in lora_modules(model)):
        raise ValueError("the model's adapter is merged; call unmerge_lora(model) before adding adapters")
    if adapter_name not in existing and existing and cfg.modules_to_save:
        raise ValueError(
            f"modules_to_save={cfg.modules_to_save!r} with a second adapter ({adapter_name!r} beside {existing}): "
            "modules trained fully belong to the model's first adapter only; leave modules_to_save empty here"
        )
    in_use = {m.lora_adapter_name for _, m in lora_modules(model) if m.lora_enabled}
    return not existing, not existing or in_use == {adapter_name}


def _layer_selection(cfg: PeftConfig) -> str:
    if cfg.layers_to_transform is None:
        return ""
    return f", layers_to_transform={cfg.layers_to_transform!r}, layers_pattern={cfg.layers_pattern!r}"


def _check_every_target_matches(model: nn.Module, cfg: PeftConfig, linear_names: list[str]) -> None:
    """Each `target_modules` entry must match at least one linear module (before `exclude_modules` and the
    layer selection), else it is most likely a typo: raise naming it and its nearest real names. A plain
    name of a non-linear module is left to `ModuleMatcher`, whose error says so."""
    all_names = [name for name, _ in model.named_modules()]
    embedding_names = [name for name, m in model.named_modules() if is_embedding(m)]
    for entry in cfg.target_modules:
        names = all_names if is_plain_name(entry) else linear_names + embedding_names  # embeddings when named
        if any(name_matches(entry, name) for name in names):
            continue
        close = near_misses(entry, linear_names)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"the linear modules are e.g. {linear_names[:8]}"
        raise ValueError(
            f"PeftConfig.target_modules entry {entry!r} matches no linear module of {type(model).__name__} "
            f"(HF PEFT: \"Target modules {{{entry!r}}} not found in the base model\"); {hint} "
            "Fix or remove the entry, or set allow_unmatched_targets=True for a config shared across architectures"
        )


def init_lora_weights(model: nn.Module) -> int:
    """Initialise every adapter of `model` (after `to_empty` on a meta-built model). Returns the count."""
    modules = lora_modules(model)
    for _, module in modules:
        for holder in holders(module).values():
            init_holder(module, holder, LinearLoRA.reset_lora_parameters)  # an embedding has its own init
            reset_magnitude_(module, holder)  # DoRA: ||W||_row, from the module's base weight
    return len(modules)


def set_kernel_options(model: nn.Module, options: KernelOptions | Mapping[str, Any]) -> int:
    """Set the `KernelOptions` of every adapted module of `model` (or of `model` itself if it is one).

    The next forward of each module uses them; nothing else about the adapter changes. To give one
    module its own options, call this on that module (or pass `kernels=` to `patch_linear_module`).

    Args:
        model: a model with adapters, or one adapted module.
        options: a `KernelOptions`, or a mapping such as ``{"base_gemm": "cublas"}`` (missing keys take
            their environment defaults).

    Returns:
        The number of modules changed.

    Raises:
        ValueError: `model` has no adapters, or `options` is not valid.
    """
    options = KernelOptions.from_dict(dict(options) if isinstance(options, Mapping) else options)
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters; call apply_lora_to_linear_modules first")
    for _, module in modules:
        for holder in holders(module).values():
            holder.lora_settings = holder.lora_settings.replace(kernels=options)
    return len(modules)


def _folded(module: LinearLoRA, sign: float) -> torch.Tensor:
    """The base weight with `sign * s * B @ A` added (DoRA: rescaled, `dora.dora_folded`), in the weight's dtype
    (not written)."""
    if magnitude_of(module) is not None:
        return dora_folded(module, sign)
    weight = module.weight
    delta = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * (sign * module.lora_settings.scale)  # (N, K)
    if module.fan_in_fan_out:  # a Conv1D stores its weight (in, out) = (K, N): fold (s B A)^T
        delta = delta.t()
    return (weight.float() + delta).to(weight.dtype)


def _check_finite(modules: Iterable[tuple[str, LinearLoRA]], sign: float, verb: str) -> None:
    """Raise before anything is written if folding any adapter would give a non-finite weight."""
    for name, module in modules:
        _raise_if_not_finite(name, module, _folded(module, sign), verb, "No base weight was changed")
        check_bias_finite(name, module, folded_bias(module, sign), verb, "No base weight was changed")


def _raise_if_not_finite(name: str, module: LinearLoRA, folded: torch.Tensor, verb: str, unchanged: str) -> None:
    bad = int((~torch.isfinite(folded)).sum())
    if bad:
        parts = (module.lora_A.weight, module.lora_B.weight, magnitude_of(module))
        adapter_finite = all(bool(torch.isfinite(p).all()) for p in parts if p is not None)
        reason = (
            f"the base weight itself is not finite or the sum overflows {module.weight.dtype}"
            if adapter_finite
            else "its lora_A / lora_B (or DoRA magnitude) hold NaN or Inf (a diverged training run?)"
        )
        raise ValueError(
            f"cannot {verb} the adapter of {name!r}: the result would have {bad} non-finite values ({reason}). "
            f"{unchanged}. Load finite adapter weights, or keep the adapter unmerged"
        )


@torch.no_grad()
def _fold_all(modules: list[tuple[str, LinearLoRA]], sign: float, safe: bool) -> None:
    """Fold (sign +1) or unfold (-1) every adapter: all checked first, then all written, so an error changes
    nothing. Each weight is computed twice when `safe` (one extra GEMM of (N, r) x (r, K) per module)
    rather than keeping every new weight at once (a second copy of the model's adapted weights)."""
    if safe:
        _check_finite(modules, sign, "merge" if sign > 0 else "unmerge")
    for _, module in modules:
        folded = _folded(module, sign)
        record_merge_norm(module, sign)  # DoRA: the norm of the unmerged weight, taken before it is written
        module.weight.copy_(folded)
        fold_bias_(module, sign)  # s * lora_B.bias into the base bias (lora_bias adapters)
        module.lora_merged = sign > 0


def _check_mergeable(model: nn.Module, modules: list[tuple[str, LinearLoRA]]) -> None:
    """Refuse to merge into a quantized weight, or one that another module shares (tied embeddings)."""
    names_of: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(pname)
    for name, module in modules:
        check_bias_mergeable(name, module)
        if is_quantized_linear(module):
            raise ValueError(
                f"cannot merge the adapter of {name!r} into its {module._lora_base_cls.__name__} base: "
                "the base weight is quantized (4-bit), and adding B @ A to it would need a dequantize / requantize "
                "round trip that loses the adapter's precision. Keep the adapter separate, or merge into a "
                "bf16 copy of the base model loaded without quantization"
            )
        sharers = [n for n in names_of.get(id(module.weight), []) if n != (f"{name}.weight" if name else "weight")]
        if sharers:
            raise ValueError(
                f"cannot merge the adapter of {name!r}: its weight is shared with {sharers} (tied weights), so "
                "merging would change those modules too. Untie the weights first (e.g. clone the weight into a "
                "new nn.Parameter) or keep the adapter unmerged"
            )


def merge_lora(model: nn.Module, safe: bool = True) -> int:
    """Fold `s * B @ A` into each adapted base weight (and `s * lora_B.bias` into the base bias, for
    `lora_bias` adapters; for DoRA adapters the weight becomes `(m / ||W + s B A||_row)[:, None] * (W + s B A)`,
    as PEFT merges, and the norm is kept on the module for `unmerge_lora`); adapters are then skipped in forward.

    All or nothing: every module is checked (and, with `safe`, every merged weight computed and checked
    for NaN/Inf) before any weight is written, so after an error every base weight is unchanged.
    Merging an already merged model warns and does nothing.

    Args:
        model: a model with adapters (or one adapted module).
        safe: check each merged weight for NaN/Inf before writing (one `isfinite` pass and one extra
            low-rank product per module).

    Returns:
        The number of modules merged (already merged ones are left as they are).

    Raises:
        ValueError: an adapted base is 4-bit quantized, its weight is tied to another module's, it has no
            bias while its adapter has a lora_B bias (PEFT refuses it too), or (with `safe`) a merged weight
            would hold NaN/Inf; the message names the module. Nothing is changed.
    """
    modules, all_experts = lora_modules(model), experts_lora_modules(model)
    pending = [(n, m) for n, m in modules if not m.lora_merged and m.lora_enabled]
    experts = [(n, m) for n, m in all_experts if not m.lora_merged]
    if (modules or all_experts) and not pending and not experts:
        warnings.warn("merge_lora: every adapter of this model in use is already merged (or the adapters are "
                      "disabled); nothing was done", stacklevel=2)
        return 0
    _check_mergeable(model, pending)
    if safe:
        check_fold_finite(experts, 1.0)
    _fold_all(pending, 1.0, safe)
    for _, module in experts:
        fold_experts(module, 1.0)
    return len(pending) + len(experts)


def unmerge_lora(model: nn.Module, safe: bool = True) -> int:
    """Undo `merge_lora`: subtract `s * B @ A` again (DoRA: divide by the merge's row scale first), exact up to
    the base dtype's rounding.

    All or nothing as `merge_lora`. Unmerging a model with no merged adapter warns and does nothing.

    Args:
        model: a model with merged adapters.
        safe: check each restored weight for NaN/Inf before writing.

    Returns:
        The number of modules unmerged.

    Raises:
        ValueError: (with `safe`) a restored weight would hold NaN/Inf (an adapter changed to NaN after
            the merge); the message names the module. Nothing is changed.
    """
    modules, all_experts = lora_modules(model), experts_lora_modules(model)
    merged = [(n, m) for n, m in modules if m.lora_merged]
    experts = [(n, m) for n, m in all_experts if m.lora_merged]
    if (modules or all_experts) and not merged and not experts:
        warnings.warn("unmerge_lora: no adapter of this model is merged; nothing was done", stacklevel=2)
        return 0
    if safe:
        check_fold_finite(experts, -1.0)
    _fold_all(merged, -1.0, safe)
    for _, module in experts:
        fold_experts(module, -1.0)
    return len(merged) + len(experts)


def remove_lora(model: nn.Module, merge: bool = False) -> int:
    """Take every adapter off and give each module back its original class.

    Args:
        model: a model with adapters.
        merge: fold the adapter in use into the base weights first (as `merge_lora`; a model's other named
            adapters are dropped); otherwise merged adapters are unmerged so the base is the original.

    Returns:
        The number of modules restored.

    Raises:
        ValueError: as `merge_lora` / `unmerge_lora` (checked before anything changes: after an error the
            model keeps its adapters and its base weights).
    """
    modules, experts = lora_modules(model), experts_lora_modules(model)
    sign = 1.0 if merge else -1.0
    to_fold = [(n, m) for n, m in experts if m.lora_merged != merge]
    check_fold_finite(to_fold, sign)
    if merge:
        pending = [(n, m) for n, m in modules if not m.lora_merged and m.lora_enabled]
        _check_mergeable(model, pending)
        _fold_all(pending, 1.0, safe=True)
    else:
        _fold_all([(n, m) for n, m in modules if m.lora_merged], -1.0, safe=True)
    for _, module in to_fold:
        fold_experts(module, sign)
    restore_mlp_classes(model)
    unmark_modules_to_save(model)
    for _, module in modules:
        unpatch(module)
    for _, module in experts:
        unpatch_experts(module)
    return len(modules) + len(experts)


def unpatch(module: LinearLoRA) -> None:
    """Take every adapter off one (unmerged) module and give it back its original class."""
    for attr in (*ADAPTER_PARTS, INACTIVE):
        module._modules.pop(attr, None)
    module._parameters.pop(MAGNITUDE, None)
    unpatch_parameters(module)  # an embedding's lora_embedding_A / lora_embedding_B
    for attr in (*LORA_ATTRIBUTES, "lora_adapter_name", "lora_enabled", "lora_use_triton", MERGE_NORM):
        module.__dict__.pop(attr, None)
    module.__class__ = module._lora_base_cls
