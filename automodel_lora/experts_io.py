"""Expert adapters in HF PEFT's on-disk format (`target_parameters`), both ways.

PEFT wraps each targeted parameter of a module in a `ParamWrapper`, nested in the module's registration
order: with k targeted weights p_0 .. p_{k-1}, the keys of p_i carry `.base_layer` k-1-i times
(`mlp.experts.base_layer.lora_A.weight` is `gate_up_proj`'s, `mlp.experts.lora_A.weight` `down_proj`'s).
Per weight, with E experts and rank r:

    file lora_A (r*E, in):  row e*r + j      = A[e, j, :]        (ours: A (E, r, in))
    file lora_B (out, r*E): column j*E + e   = B[e, :, j]        (ours: B (E, out, r))

and the scale is PEFT's, lora_alpha / r (rsLoRA: / sqrt(r)); `rank_pattern` / `alpha_pattern` keys match
`<module fqn>.<weight>`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .adapter_format import AdapterConfig, AdapterFormatError
from .config import LoraSettings
from .experts_lora import ExpertsLoRA, expert_params, experts_lora_modules, is_experts_module, patch_experts_module

__all__ = ["experts_state", "experts_target_parameters", "split_expert_pairs", "check_expert_pairs",
           "check_expert_destination", "load_expert_pairs"]

BASE_LAYER = ".base_layer"


def _file_prefix(fqn: str, names: list[str], name: str) -> str:
    return fqn + BASE_LAYER * (len(names) - 1 - names.index(name))


def experts_state(model: nn.Module, full_tensor) -> dict[str, torch.Tensor]:
    """{PEFT key less its prefix: tensor} of every expert adapter (``full_tensor`` gathers a sharded one)."""
    state = {}
    for fqn, module in experts_lora_modules(model):
        names = list(module.lora_A)
        for name in names:
            A, B = full_tensor(module.lora_A[name]), full_tensor(module.lora_B[name])  # (E, r, in), (E, out, r)
            prefix = _file_prefix(fqn, [n for n in expert_params(module) if n in names], name)
            state[f"{prefix}.lora_A.weight"] = A.reshape(-1, A.shape[-1])  # (E*r, in)
            state[f"{prefix}.lora_B.weight"] = B.permute(1, 2, 0).reshape(B.shape[1], -1)  # (out, r*E)
    return state


def experts_target_parameters(model: nn.Module) -> tuple[list[str], dict[str, LoraSettings]]:
    """(``target_parameters`` selecting exactly the adapted expert weights, {"<fqn>.<weight>": settings}).
    Short suffixes (``mlp.experts.gate_up_proj``) where they select exactly those; else full names."""
    adapted = {f"{fqn}.{n}": m.lora_settings[n] for fqn, m in experts_lora_modules(model) for n in m.lora_A}
    everything = [f"{fqn}.{n}" for fqn, m in model.named_modules() if is_experts_module(m) for n in expert_params(m)]
    short = sorted({".".join(key.split(".")[-3:]) for key in adapted})
    if {k for k in everything if any(k == s or k.endswith("." + s) for s in short)} == set(adapted):
        return short, adapted
    return sorted(adapted), adapted


def split_expert_pairs(model: nn.Module, pairs: dict, cfg: AdapterConfig, path: str) -> dict:
    """Take the expert adapters out of ``pairs`` ({file fqn: (lora_A, lora_B)}, changed in place): returns
    {(experts fqn, weight): (A (E, r, in), B (E, out, r))}, checked against the model.

    Raises:
        AdapterFormatError: the file's tensors do not fit the expert weight (naming the key), or an expert
            weight that ``target_parameters`` selects has no tensors (naming it).
    """
    if not cfg.target_parameters:
        return {}
    modules = dict(model.named_modules())
    found = {}
    for key in list(pairs):
        fqn, depth = key, 0
        while fqn.endswith(BASE_LAYER):
            fqn, depth = fqn[: -len(BASE_LAYER)], depth + 1
        module = modules.get(fqn)
        if module is None or not is_experts_module(module):
            continue
        names = [n for n in expert_params(module) if _targeted(cfg, f"{fqn}.{n}")]
        if depth >= len(names):
            raise AdapterFormatError(f"{path}: {key!r} is nested {depth} deep, but target_parameters="
                                     f"{cfg.target_parameters!r} selects {names} of {fqn!r}; save the adapter again")
        name = names[len(names) - 1 - depth]
        found[(fqn, name)] = _to_ours(module, name, *pairs.pop(key), f"{path}: {key}")
        rank, rank_key = cfg.rank_for(f"{fqn}.{name}")
        if rank is not None and rank != found[(fqn, name)][0].shape[1]:
            raise AdapterFormatError(f"{cfg.path!r}: {rank_key}={rank} is the rank of {fqn}.{name}, but {path} holds "
                                     f"rank {found[(fqn, name)][0].shape[1]} for it; fix r / rank_pattern")
    for fqn, module in modules.items():
        if is_experts_module(module):
            for name in expert_params(module):
                if _targeted(cfg, f"{fqn}.{name}") and (fqn, name) not in found:
                    raise AdapterFormatError(f"{path}: target_parameters={cfg.target_parameters!r} selects "
                                             f"{fqn}.{name}, but the file has no adapter for it")
    return found


def _targeted(cfg: AdapterConfig, key: str) -> bool:
    return any(key == entry or key.endswith("." + entry) for entry in cfg.target_parameters)


def _to_ours(module: nn.Module, name: str, file_A: torch.Tensor, file_B: torch.Tensor, where: str):
    weight = getattr(module, name)
    experts = weight.shape[0]
    fan_in, fan_out = (weight.shape[1], weight.shape[2]) if module.is_transposed else (weight.shape[2], weight.shape[1])
    r = file_A.shape[0] // experts
    if file_A.shape != (r * experts, fan_in) or file_B.shape != (fan_out, r * experts) or r < 1:
        raise AdapterFormatError(
            f"{where}: lora_A {tuple(file_A.shape)} / lora_B {tuple(file_B.shape)} do not fit {name} "
            f"{tuple(weight.shape)} ({experts} experts: expected (r*{experts}, {fan_in}) and ({fan_out}, r*{experts}))")
    return file_A.reshape(experts, r, fan_in), file_B.reshape(fan_out, r, experts).permute(2, 0, 1)


def _settings(cfg: AdapterConfig, key: str, A: torch.Tensor) -> LoraSettings:
    return LoraSettings(dim=A.shape[1], alpha=cfg.alpha_for(key), use_rslora=cfg.use_rslora)


def check_expert_pairs(model: nn.Module, found: dict, cfg: AdapterConfig, path: str) -> None:
    """Everything :func:`load_expert_pairs` needs, checked before the model is changed.

    Raises:
        AdapterFormatError: an expert weight adapted already with another rank or scale than the file's.
        ValueError: the model's expert adapters are merged.
    """
    modules = dict(model.named_modules())
    for (fqn, name), (A, _) in found.items():
        module, key = modules[fqn], f"{fqn}.{name}"
        if isinstance(module, ExpertsLoRA) and module.lora_merged:
            raise ValueError(f"the model's expert adapters are merged ({fqn!r}); call unmerge_lora(model) before "
                             "load_adapter")
        if isinstance(module, ExpertsLoRA) and name in module.lora_A:
            have, want = module.lora_settings[name], _settings(cfg, key, A)
            if (have.dim, have.scale) != (want.dim, want.scale):
                raise AdapterFormatError(f"{path}: {key} has rank {want.dim}, scale {want.scale:g} in the file "
                                         f"but rank {have.dim}, scale {have.scale:g} in the model")


def check_expert_destination(model: nn.Module, found: dict, names: list, adapter_name: str | None) -> None:
    """Expert adapters belong to a model's first adapter (or to a model without adapters).

    Raises:
        ValueError: the file would put expert adapters into another named adapter.
    """
    if not found or not names:
        return
    if not experts_lora_modules(model) or adapter_name not in (None, names[0]):
        raise ValueError(f"expert adapters belong to a model's first adapter; this model has {names} and the file "
                         "would add experts to another: load it into the base model (or into its first adapter)")


@torch.no_grad()
def load_expert_pairs(model: nn.Module, found: dict, cfg: AdapterConfig, copy_into) -> int:
    """Patch (where needed) and fill the expert adapters ``found`` (from :func:`split_expert_pairs`, checked by
    :func:`check_expert_pairs`). Returns their count."""
    modules = dict(model.named_modules())
    for (fqn, name), (A, B) in found.items():
        module = modules[fqn]
        if not (isinstance(module, ExpertsLoRA) and name in module.lora_A):
            patch_experts_module(module, [name], _settings(cfg, f"{fqn}.{name}", A))
        copy_into(module.lora_A[name], A)
        copy_into(module.lora_B[name], B)
    return len(found)
