"""Which expert weights a `PeftConfig` adapts (`target_parameters`, `match_all_experts`), and adapting them.

HF PEFT's rule for `target_parameters`: an entry selects the parameter whose `<module fqn>.<name>`
equals it or ends with `"." + entry`. Every entry must select an expert weight; one that selects
nothing, or a parameter that is not a fused expert weight, is an error naming it (never a silent skip).
"""

from __future__ import annotations

import torch.nn as nn

from .config import PeftConfig
from .experts_lora import EXPERT_PARAMS, expert_params, experts_lora_modules, is_experts_module, patch_experts_module

__all__ = ["select_expert_params", "check_experts_adaptable", "apply_lora_to_experts"]


def _selects(entry: str, key: str) -> bool:
    return key == entry or key.endswith("." + entry)


def select_expert_params(model: nn.Module, cfg: PeftConfig) -> dict[str, list[str]]:
    """{experts module fqn: [weight names]} that ``cfg`` adapts (in the module's registration order).

    Raises:
        ValueError: a `target_parameters` entry that selects no parameter, or one that is not a fused expert
            weight of a transformers experts module (the message names it and the expert weights there are).
    """
    experts = {fqn: m for fqn, m in model.named_modules() if is_experts_module(m)}
    chosen: dict[str, set[str]] = {}
    if cfg.match_all_experts:
        for fqn, module in experts.items():
            chosen[fqn] = set(expert_params(module))
    all_keys = {f"{fqn}.{n}" if fqn else n: (fqn, m, n) for fqn, m in model.named_modules()
                for n, _ in m.named_parameters(recurse=False)}
    examples = [f"{fqn}.{n}" for fqn, m in experts.items() for n in expert_params(m)][:4]
    for entry in cfg.target_parameters:
        hits = [v for k, v in all_keys.items() if _selects(entry, k)]
        if not hits:
            raise ValueError(
                f"PeftConfig.target_parameters entry {entry!r} selects no parameter of {type(model).__name__} "
                f"(HF PEFT: a name or dotted suffix of '<module>.<parameter>'); its expert weights are e.g. "
                f"{examples or 'none: it has no transformers experts module'}")
        for fqn, module, name in hits:
            if fqn not in experts or name not in expert_params(module):
                raise ValueError(
                    f"PeftConfig.target_parameters entry {entry!r} selects {fqn}.{name} of {type(module).__name__}, "
                    f"which is not a fused expert weight ({'/'.join(EXPERT_PARAMS)} of a transformers experts "
                    "module); adapt linear modules with target_modules")
            chosen.setdefault(fqn, set()).add(name)
    return {fqn: [n for n in expert_params(experts[fqn]) if n in names] for fqn, names in chosen.items()}


def check_experts_adaptable(model: nn.Module, selected: dict[str, list[str]]) -> None:
    """What :func:`apply_lora_to_experts` would refuse, checked before anything is changed.

    Raises:
        ValueError: the model has expert adapters already (one adapter on experts per model), or a selected
            experts module runs under expert parallelism.
    """
    if selected and experts_lora_modules(model):
        raise ValueError("the model's experts have an adapter already; remove_lora(model) first (named adapters "
                         "beside it are for linear modules only)")
    modules = dict(model.named_modules())
    parallel = [fqn for fqn in selected if getattr(modules[fqn], "_is_expert_parallel", False)]
    if parallel:
        raise ValueError(f"{parallel[0]!r} runs under expert parallelism, which LoRA on experts does not support; "
                         "load the model without it")


def apply_lora_to_experts(model: nn.Module, cfg: PeftConfig, selected: dict[str, list[str]]) -> int:
    """Adapt the expert weights ``selected`` (from :func:`select_expert_params`, checked by
    :func:`check_experts_adaptable`) with ``cfg``'s rank and alpha (``rank_pattern`` / ``alpha_pattern`` keyed
    by ``<module fqn>.<weight>``). Returns the count of weights."""
    modules = dict(model.named_modules())
    count, base = 0, cfg.lora_settings()
    for fqn, names in selected.items():
        for name in names:
            patch_experts_module(modules[fqn], [name], cfg.settings_for(f"{fqn}.{name}", base), cfg.use_triton)
            count += 1
    return count
