"""`merge_and_save`: a model with its adapters merged, written as a plain transformers checkpoint, while the model
in memory stays adapted (its base weights bit for bit)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapter_bias import check_bias_finite, folded_bias
from .experts_lora import ExpertsLoRA, check_fold_finite, experts_lora_modules, folded
from .injection import _check_mergeable, _folded, _raise_if_not_finite
from .lora import LinearLoRA, lora_modules


@torch.no_grad()
def merge_and_save(model: nn.Module, save_directory, *, safe: bool = True, **save_pretrained_kwargs: Any) -> int:
    """Write `model` with every adapter merged as a plain transformers model (PEFT's `merge_and_unload()`
    then `save_pretrained`), leaving `model` itself untouched: still adapted, base weights bit for bit.

    The directory holds the base model's config and a state dict with the original keys (no `lora_` keys;
    gated MLPs swapped by `recompute_mlp_input` keep their FQNs), so `AutoModelForCausalLM.from_pretrained`
    / vLLM load it with no trace of this library. Each merged weight is `W + s B A` computed in fp32 and
    rounded once to W's dtype, the same bits `merge_lora` would write.

    Why non-destructive: the merged weights are built beside the model and handed to
    `save_pretrained(state_dict=...)`, instead of merging in place and unmerging afterwards, because
    unmerging is not exact in bf16 (`(W + d) - d != W`): a model that goes on training or serving after a
    checkpoint must come back bit for bit. The cost is one copy, in host memory, of each adapted weight
    (the merged copies are moved to the CPU as they are made; one fp32 temporary of one weight at a time
    on the weight's device). For PEFT's destructive behaviour, call `remove_lora(model, merge=True)` and
    then `model.save_pretrained(...)`.

    Args:
        model: a transformers `PreTrainedModel` with adapters (merged adapters are saved as they are).
        save_directory: where `save_pretrained` writes.
        safe: check every merged weight for NaN/Inf before anything is written.
        **save_pretrained_kwargs: passed on (`max_shard_size`, `safe_serialization`, `is_main_process`, ...).

    Returns:
        The number of adapted modules whose merged weights were written.

    Raises:
        TypeError: `model` is not a `PreTrainedModel`.
        ValueError: `model` has no adapters, an adapted base is 4-bit quantized, its weight is tied to
            another module's, it has no bias for its adapter's lora_B bias, or (with `safe`) a merged weight
            would hold NaN/Inf; the message names the module. Nothing is written and the model is unchanged.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"merge_and_save needs a transformers PreTrainedModel (it writes with save_pretrained), not "
            f"{type(model).__name__}. For another model call remove_lora(model, merge=True), then save it however "
            "you like (torch.save(model.state_dict(), ...))"
        )
    modules, experts = lora_modules(model), experts_lora_modules(model)
    if not modules and not experts:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters; call model.save_pretrained directly")
    _check_mergeable(model, [(n, m) for n, m in modules if not m.lora_merged and m.lora_enabled])
    if safe:
        check_fold_finite([(n, m) for n, m in experts if not m.lora_merged], 1.0)
    state_dict = _merged_state_dict(model, modules, safe)
    _merge_experts_into(state_dict, experts)
    model.save_pretrained(save_directory, state_dict=state_dict, **save_pretrained_kwargs)
    return len(modules) + len(experts)


def _merge_experts_into(state_dict: dict, experts: list[tuple[str, ExpertsLoRA]]) -> None:
    """Each adapted expert weight in ``state_dict`` replaced by its merged copy (CPU), the adapters dropped."""
    for name, module in experts:
        prefix = f"{name}." if name else ""
        for key in [k for k in state_dict if k.startswith(f"{prefix}lora_")]:
            del state_dict[key]
        for weight in module.lora_A:
            w = getattr(module, weight).detach()
            if module.lora_merged:
                state_dict[f"{prefix}{weight}"] = w.cpu()
                continue
            merged = torch.empty(w.shape, dtype=w.dtype)  # on the CPU, filled one expert at a time
            for e in range(w.shape[0]):
                merged[e] = folded(module, weight, e, 1.0).cpu()
            state_dict[f"{prefix}{weight}"] = merged


def _merged_state_dict(model: nn.Module, modules: list[tuple[str, LinearLoRA]], safe: bool) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with each adapted weight replaced by a merged copy (on the CPU) and every adapter
    tensor (`lora_*` children and attributes of adapted modules) dropped. The model is not written."""
    state_dict = model.state_dict()
    for name, module in modules:
        prefix = f"{name}." if name else ""
        adapter = tuple(f"{prefix}{child}." for child, _ in module.named_children())
        for key in [k for k in state_dict if k.startswith(adapter) or k.startswith(f"{prefix}lora_")]:
            del state_dict[key]
        if module.lora_merged or not module.lora_enabled:  # merged already, or no adapter in use here
            continue
        merged, bias = _folded(module, 1.0), folded_bias(module, 1.0)
        if safe:
            _raise_if_not_finite(name, module, merged, "merge", "Nothing was written and the model is unchanged")
            check_bias_finite(name, module, bias, "merge", "Nothing was written and the model is unchanged")
        state_dict[f"{prefix}weight"] = merged.cpu()
        if bias is not None:
            state_dict[f"{prefix}bias"] = bias.cpu()
    return state_dict
