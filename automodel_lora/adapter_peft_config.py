"""The `adapter_config.json` that `save_adapter` writes: HF PEFT's `LoraConfig` fields describing a model's adapters."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from torch import nn

from .adapter_format import peft_selects
from .adapter_slots import adapter_holders, adapter_names, adapter_part_ids
from .config import PeftConfig
from .embedding_lora import is_embedding, is_lora_target
from .experts_io import experts_target_parameters
from .modules_to_save import marked_modules


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None = None,
                        peft_config: PeftConfig | None = None, adapter_name: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` contents describing `model`'s adapters, as HF PEFT's `LoraConfig` writes it.

    `target_modules` are short names (`q_proj`) where they select exactly the adapted modules by PEFT's rule,
    as vLLM expects, narrowed by `peft_config`'s `layers_to_transform` / `layers_pattern` where needed (then
    written too); else full FQNs. Ranks and alphas that differ from the most common one are written to
    `rank_pattern` / `alpha_pattern` with one anchored key per module. `modules_to_save` lists the FQNs of the
    modules trained fully (`automodel_lora.modules_to_save`), or is None. `adapter_name` picks one of several
    named adapters (default: the only one, or the one in use).
    """
    name, modules = adapter_holders(model, adapter_name)
    settings = {fqn: m.lora_settings for fqn, m in modules}
    target_parameters, expert_settings = experts_target_parameters(model)
    if adapter_names(model)[:1] not in ([], [name]):  # the experts' adapter is the model's first
        target_parameters, expert_settings = [], {}
    settings.update(expert_settings)
    ranks = Counter(s.dim for s in settings.values())
    alphas = Counter(s.alpha for s in settings.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    dropouts = {m.lora_dropout.p for _, m in modules} or {0.0}
    rslora = {s.use_rslora for s in settings.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT's format has one use_rslora flag per adapter, but this model mixes rsLoRA and plain LoRA")
    lora_bias = {s.lora_bias for s in settings.values()}
    if len(lora_bias) > 1:
        raise ValueError("PEFT's format has one lora_bias flag per adapter, but this model mixes adapters with and "
                         "without a lora_B bias; apply one PeftConfig (one lora_bias value) to every adapted module")
    use_dora = {s.use_dora for s in settings.values()}
    if len(use_dora) > 1:
        raise ValueError("PEFT's format has one use_dora flag per adapter, but this model mixes DoRA and plain LoRA "
                         "adapters; apply one PeftConfig (one use_dora value) to every adapted module")
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        **_targets(model, [fqn for fqn, _ in modules], peft_config),
        "target_parameters": target_parameters or None,  # expert weights (`automodel_lora.experts_io`)
        "exclude_modules": None,
        "use_rslora": rslora.pop(),
        "bias": "none",
        # PEFT's flag for `Conv1D` bases (weight `(in, out)`); PEFT corrects it per module by type on load.
        "fan_in_fan_out": any(m.fan_in_fan_out and not is_embedding(m) for _, m in modules),  # PEFT: Conv1D only
        "init_lora_weights": True,
        # the FQNs of the modules trained fully (PEFT's rule `fqn.endswith(entry)` selects each one)
        "modules_to_save": [name for name, _ in marked_modules(model)] or None,
        "rank_pattern": {_exact(name): s.dim for name, s in settings.items() if s.dim != rank},
        "alpha_pattern": {_exact(name): s.alpha for name, s in settings.items() if s.alpha != alpha},
        "use_dora": use_dora.pop(),  # a magnitude per module (`<fqn>.lora_magnitude_vector` in the weights file)
        "lora_bias": lora_bias.pop(),  # a bias on every lora_B (`<fqn>.lora_B.bias` in the weights file)
    }


def _targets(model: nn.Module, adapted: list[str], peft_config: PeftConfig | None) -> dict[str, Any]:
    """`target_modules`, `layers_to_transform` and `layers_pattern` that select exactly `adapted` by PEFT's rule."""
    if not adapted:  # expert adapters alone
        return {"target_modules": [], "layers_to_transform": None, "layers_pattern": None}
    short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    parts = adapter_part_ids(model)
    linears = [n for n, m in model.named_modules() if is_lora_target(m) and id(m) not in parts]
    choices = [(None, None)]
    if peft_config is not None and peft_config.layers_to_transform not in (None, []):
        choices.append((peft_config.layers_to_transform, peft_config.layers_pattern))
    for layers, pattern in choices:
        if {n for n in linears if peft_selects(short, n, layers, pattern)} == set(adapted):
            return {"target_modules": short, "layers_to_transform": layers, "layers_pattern": pattern}
    return {"target_modules": sorted(adapted), "layers_to_transform": None, "layers_pattern": None}


def _exact(fqn: str) -> str:
    return "^" + re.escape(fqn)
