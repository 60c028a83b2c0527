"""Adapter files in HF PEFT's on-disk format, so PEFT, vLLM and the rest load them.

A directory holds:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "target_modules": [...], ...}
    adapter_model.safetensors    base_model.model.<fqn>.lora_A.weight  (r, in_features)
                                 base_model.model.<fqn>.lora_B.weight  (out_features, r)
                                 base_model.model.<fqn>.lora_B.bias    (out_features,)  with lora_bias
                                 base_model.model.<fqn>.lora_magnitude_vector  (out_features,)  with use_dora
    automodel_lora_config.json   (optional) this library's full `PeftConfig`, which PEFT ignores

Each file is written to a temporary name, flushed to disk, then renamed, so a
crash never leaves a half-written adapter under the real name.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .adapter_bias import check_file_biases, check_patched_biases
from .adapter_dora import check_file_magnitudes, check_patched_magnitudes
from .adapter_fit import check_patched_model, check_targets_covered, check_unpatched_model
from .adapter_format import (
    PEFT_KEY_PREFIX,
    AdapterConfig,
    AdapterFormatError,
    check_tensors_fit_config,
    read_adapter_config,
    read_json_object,
)
from .adapter_peft_config import peft_adapter_config
from .adapter_slots import (
    DEFAULT_ADAPTER_NAME,
    adapter_holders,
    adapter_names,
    attach_adapter,
    check_adapter_name,
    check_not_in_disabled_block,
)
from .adapter_weights import read_adapter_file
from .atomic_files import atomic_write, atomic_write_json
from .config import LoraSettings, PeftConfig
from .dora import magnitude_of
from .embedding_lora import adapter_keys, check_embedding_selection, check_embedding_tables
from .experts_io import (
    check_expert_destination,
    check_expert_pairs,
    experts_state,
    load_expert_pairs,
    split_expert_pairs,
)
from .experts_lora import experts_lora_modules
from .kernels.options import KernelOptions
from .lora import lora_modules
from .modules_to_save import check_saved_tensors, load_saved_tensors, modules_to_save_state
from .recompute import recompute_mlp_inputs

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LIBRARY_CONFIG_NAME = "automodel_lora_config.json"


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` under their FQNs (`<fqn>.lora_A.weight`, `<fqn>.lora_B.weight`, and
    `<fqn>.lora_B.bias` for `lora_bias` adapters, `<fqn>.lora_magnitude_vector` for DoRA ones), and
    the full state of every `modules_to_save` module (`<fqn>.weight`, ...; PEFT's on-disk keys less its prefix).

    `adapter_name` picks one of several named adapters (default: the only one, or the one in use); its
    tensors get the same keys wherever they live in the model.

    Sharded (FSDP2 `DTensor`) adapters are gathered to full tensors, which is a
    collective: call it on every rank.
    """
    state = {}
    for fqn, module in adapter_holders(model, adapter_name)[1]:
        prefix = f"{fqn}." if fqn else ""
        key_A, key_B = adapter_keys(module)  # PEFT's names: `lora_embedding_A` / `_B` on an embedding
        state[prefix + key_A], state[prefix + key_B] = _full_tensor(module.lora_A.weight), _full_tensor(module.lora_B.weight)
        if module.lora_B.bias is not None:
            state[f"{prefix}lora_B.bias"] = _full_tensor(module.lora_B.bias)
        magnitude = magnitude_of(module)
        if magnitude is not None:  # PEFT's on-disk key: no `.weight`
            state[f"{prefix}lora_magnitude_vector"] = _full_tensor(magnitude)
    state.update(modules_to_save_state(model, _full_tensor))
    if adapter_name in (None, *adapter_names(model)[:1]):  # the experts' adapter is the model's first
        state.update(experts_state(model, _full_tensor))
    return state


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    peft_config: PeftConfig | None = None,
    base_model_name_or_path: str | None = None,
    *,
    adapter_name: str | None = None,
) -> None:
    """Write `model`'s adapters to the directory `path` in HF PEFT's format.

    Args:
        model: a model patched by `apply_lora_to_linear_modules` (or `patch_linear_module`).
        path: output directory (created if missing; files in it are replaced atomically).
        peft_config: the config the model was patched with; when given it is also
            stored as `automodel_lora_config.json`, so `load_adapter` restores the
            settings PEFT's format has no field for (`dropout_position`, `lora_dtype`...),
            and its `layers_to_transform` / `layers_pattern` are written to
            `adapter_config.json` where they, with short `target_modules`, select exactly
            the adapted modules.
        base_model_name_or_path: written to the PEFT config; defaults to the
            model's `config._name_or_path` / `config.name_or_path` if it has one.
        adapter_name: write this named adapter alone, in `path` itself. By default a model with one adapter
            writes it in `path`, and a model with several writes each as HF PEFT's `save_pretrained` does:
            `"default"` in `path`, every other one in `path/<name>/`.

    Under `torch.distributed` the gather is collective and only rank 0 writes.

    Raises:
        ValueError: the model has no adapters (or no adapter `adapter_name`), or `peft_config` is given for
            several adapters at once.
    """
    names = adapter_names(model) or ([DEFAULT_ADAPTER_NAME] if experts_lora_modules(model) else [])
    if not names:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save; call apply_lora_to_linear_modules first")
    if adapter_name is not None or len(names) == 1:
        _save_one(model, os.fspath(path), peft_config, base_model_name_or_path, adapter_name)
        return
    if peft_config is not None:
        raise ValueError(f"peft_config describes one adapter, but the model has {names}; save each with "
                         "adapter_name= (and its own peft_config)")
    for name in names:
        where = path if name == DEFAULT_ADAPTER_NAME else os.path.join(path, name)
        _save_one(model, os.fspath(where), None, base_model_name_or_path, name)


def _save_one(model: nn.Module, path: str, peft_config, base_model_name_or_path, adapter_name) -> None:
    state = lora_state_dict(model, adapter_name)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    # cloned: tied modules to save share one tensor, which safetensors refuses to write twice
    tensors = {PEFT_KEY_PREFIX + key: t.detach().to("cpu", copy=True).contiguous() for key, t in state.items()}
    atomic_write(os.path.join(path, ADAPTER_WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    library_cfg_path = os.path.join(path, LIBRARY_CONFIG_NAME)
    if peft_config is not None:
        atomic_write_json(library_cfg_path, peft_config.to_dict())
    elif os.path.exists(library_cfg_path):  # a stale one from an earlier save would be applied on load
        os.unlink(library_cfg_path)
    # The PEFT config goes last: its presence marks a complete adapter directory.
    atomic_write_json(os.path.join(path, ADAPTER_CONFIG_NAME),
                       peft_adapter_config(model, base_model_name_or_path, peft_config, adapter_name))


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    use_triton: bool | None = None,
    *,
    kernels: KernelOptions | None = None,
    strict: bool = True,
    adapter_name: str | None = None,
) -> int:
    """Load a PEFT-format LoRA adapter (ours or one trained with HF PEFT) into `model`.

    Named adapters: `adapter_name` loads into the model's adapter of that name, or, if the model has adapters
    but none of that name, adds it beside them (not in use: `set_adapter` switches; HF PEFT's `load_adapter`).
    Without it, the file goes into the adapter in use (the model's only one), or patches an unpatched model
    as `"default"`. A directory in HF PEFT's multi-adapter layout (`path/<name>/adapter_config.json`) is read
    from `path/<adapter_name>/`.

    If `model` has no adapters yet it is frozen and patched from the file's
    config first (ranks from the tensors, `alpha_pattern`/`rank_pattern`
    honoured); otherwise its adapters must match the file one for one.
    Everything is checked before the model is touched: after an error the model
    is as it was.

    `modules_to_save` (HF PEFT's fully trained modules): their tensors in the file are copied into the
    model's modules in place, which are then marked and made trainable, so `save_adapter` writes them again.

    Missing layers: loading into a patched model whose adapted modules get no
    weights from the file is always an error. Loading into an unpatched model, a
    linear module that the file's `target_modules` select but that has no weights
    in the file is an error with `strict` (the default) and a warning naming the
    modules otherwise (such a module would keep the base output only).

    Args:
        model: the base model (with or without adapters; not merged).
        path: directory holding `adapter_config.json` and `adapter_model.safetensors`.
        use_triton: kernel path for modules patched here; default: the saved
            `automodel_lora_config.json` if any, else True.
        kernels: `KernelOptions` for modules patched here (default: `KernelOptions()`, the
            environment defaults; kernel options are not read from the directory).
        strict: whether target modules missing from the file are an error (True) or a warning.
        adapter_name: the named adapter to load into or add (see above).

    Returns:
        The number of adapted modules loaded.

    Raises:
        FileNotFoundError: a file is missing.
        AdapterFormatError: (a `ValueError`) a file is not valid (not JSON, not an object, nested too
            deep, `r` not a positive integer, `lora_alpha` missing or not positive, `use_rslora` not a
            JSON boolean, a bad `alpha_pattern`/`rank_pattern` regex or value, a `layers_to_transform` /
            `layers_pattern` that is not indices / names, NaN/Inf or integer tensors, not plain LoRA), the
            two files disagree (a tensor's rank is not the one `r`/`rank_pattern` give its module; a
            tensor of a module that `target_modules`/`exclude_modules` do not select, by HF PEFT's rule:
            one string is a full-match regex, a list entry a name or dotted suffix, narrowed by
            `layers_to_transform`/`layers_pattern`; a `lora_B.bias` under `"lora_bias": false`, or none
            under `true`; a `lora_magnitude_vector` under `"use_dora": false`, none under `true`, one of
            the wrong shape or without its `lora_A` / `lora_B`), or it does not fit
            the model (a key naming no linear module, a shape, scale or name mismatch, missing layers, a
            lora_B bias or DoRA magnitude in the file but not in the patched model's adapter or the other way round);
            the message names the file and the key.
        ValueError: the model's adapters are merged (call `unmerge_lora` first).
    """
    path = _adapter_directory(os.fspath(path), adapter_name)
    peft_cfg = read_adapter_config(os.path.join(path, ADAPTER_CONFIG_NAME))
    library_cfg = _read_library_config(os.path.join(path, LIBRARY_CONFIG_NAME))
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    pairs, saved, biases, magnitudes, tables = read_adapter_file(weights_path, peft_cfg.modules_to_save)
    expert_pairs = split_expert_pairs(model, pairs, peft_cfg, weights_path)  # taken out of `pairs`
    check_embedding_tables(model, tables, pairs, weights_path)
    check_file_biases(peft_cfg, pairs, biases, weights_path)
    check_file_magnitudes(peft_cfg, pairs, magnitudes, weights_path)
    names = adapter_names(model)
    check_not_in_disabled_block(lora_modules(model), "load an adapter")
    merged = sorted(fqn for fqn, m in lora_modules(model) if m.lora_merged)
    if merged:
        raise ValueError(f"the model's adapters are merged (e.g. {merged[:3]}); call unmerge_lora(model) before load_adapter")
    to_save = check_saved_tensors(model, saved, peft_cfg.modules_to_save, weights_path)
    check_expert_destination(model, expert_pairs, names, adapter_name)
    check_expert_pairs(model, expert_pairs, peft_cfg, weights_path)
    if not pairs:  # expert adapters alone
        return _load_experts_alone(model, expert_pairs, peft_cfg, saved, to_save, names, adapter_name)
    if names and (adapter_name is None or adapter_name in names):  # into an adapter the model has
        adapted = dict(adapter_holders(model, adapter_name)[1])
        check_patched_model(adapted, pairs, peft_cfg, path)
        check_patched_biases(adapted, biases, path)
        check_patched_magnitudes(adapted, magnitudes, path)
        check_tensors_fit_config(peft_cfg, pairs, weights_path)
    else:  # a new adapter: patches an unpatched model, or goes beside the model's adapters
        name = check_adapter_name(adapter_name) if adapter_name is not None else DEFAULT_ADAPTER_NAME
        if names and saved:
            raise AdapterFormatError(
                f"{weights_path!r} has modules_to_save tensors, but the model has adapters already ({names}): modules "
                "trained fully belong to the model's first adapter only; load this one into an unpatched model"
            )
        modules = dict(model.named_modules())
        check_unpatched_model(model, modules, pairs, weights_path)
        if names:  # beside the model's adapters: linear modules only (named adapters are not on embeddings)
            check_embedding_selection([(fqn, modules[fqn]) for fqn in pairs], LoraSettings(), name, first=False)
        check_tensors_fit_config(peft_cfg, pairs, weights_path)
        check_targets_covered(model, pairs, peft_cfg, strict)
        _patch_from_file(model, modules, pairs, peft_cfg, library_cfg, use_triton, kernels, name, in_use=not names)
        adapted = dict(adapter_holders(model, name)[1])
    with torch.no_grad():
        for fqn, (lora_A, lora_B) in pairs.items():
            _copy_into(adapted[fqn].lora_A.weight, lora_A)
            _copy_into(adapted[fqn].lora_B.weight, lora_B)
        for fqn, bias in biases.items():
            _copy_into(adapted[fqn].lora_B.bias, bias)
        for fqn, magnitude in magnitudes.items():
            _copy_into(magnitude_of(adapted[fqn]), magnitude)
    load_saved_tensors(model, saved, to_save, _copy_into)
    return len(pairs) + load_expert_pairs(model, expert_pairs, peft_cfg, _copy_into)


def _load_experts_alone(model, expert_pairs, peft_cfg, saved, to_save, names, adapter_name) -> int:
    """`load_adapter` for a file of expert adapters only (checked): into the model's first adapter."""
    if adapter_name not in (None, DEFAULT_ADAPTER_NAME, *names[:1]):
        raise ValueError(f"expert adapters load into the model's first adapter only, not {adapter_name!r}")
    if not names and not experts_lora_modules(model):
        model.requires_grad_(False)
    count = load_expert_pairs(model, expert_pairs, peft_cfg, _copy_into)
    load_saved_tensors(model, saved, to_save, _copy_into)
    return count


def _adapter_directory(path: str, adapter_name: str | None) -> str:
    """`path/<adapter_name>` where HF PEFT's multi-adapter layout has it there, else `path`. A directory
    holding only named adapters, loaded without a name, is an error listing them."""
    if adapter_name is not None and os.path.isfile(os.path.join(path, adapter_name, ADAPTER_CONFIG_NAME)):
        return os.path.join(path, adapter_name)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, ADAPTER_CONFIG_NAME)):
        found = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, ADAPTER_CONFIG_NAME)))
        if found:
            raise FileNotFoundError(
                f"{path!r} has no {ADAPTER_CONFIG_NAME} of its own but holds the named adapters {found} (HF PEFT's "
                f"multi-adapter layout); pass adapter_name= one of them, e.g. load_adapter(model, {path!r}, "
                f"adapter_name={found[0]!r})"
            )
    return path


def _read_library_config(path: str) -> PeftConfig | None:
    if not os.path.exists(path):
        return None
    raw = read_json_object(path)
    try:
        return PeftConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise AdapterFormatError(
            f"{path!r}: {e}; fix the file or delete it (it only adds settings PEFT has no field for)"
        ) from None


def _patch_from_file(model, modules, pairs, peft_cfg: AdapterConfig, library_cfg, use_triton, kernels, name: str,
                     in_use: bool) -> None:
    """Give each module the file has weights for an adapter `name` with the file's settings (not yet its values)."""
    shared = LoraSettings(
        dropout=library_cfg.dropout if library_cfg else peft_cfg.lora_dropout,
        # PEFT drops the adapter's input; keep that unless this library saved otherwise.
        dropout_position=library_cfg.dropout_position if library_cfg else "pre",
        lora_A_init=library_cfg.lora_A_init if library_cfg else "kaiming",
        lora_dtype=library_cfg.lora_dtype if library_cfg else None,
        use_rslora=peft_cfg.use_rslora,
        kernels=kernels if kernels is not None else KernelOptions(),
        lora_bias=peft_cfg.lora_bias,
        use_dora=peft_cfg.use_dora,
    )
    if use_triton is None:
        use_triton = library_cfg.use_triton if library_cfg else True
    if in_use:  # the model's first adapter: freeze the model (beside others, their trainable state stays)
        model.requires_grad_(False)
    for fqn, (lora_A, _) in pairs.items():
        settings = shared.replace(dim=lora_A.shape[0], alpha=peft_cfg.alpha_for(fqn))
        attach_adapter(modules[fqn], name, settings, use_triton, in_use)
    if library_cfg is None or library_cfg.recompute_mlp_input:  # as apply_lora_to_linear_modules does
        recompute_mlp_inputs(model)


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    param.copy_(value.to(param.dtype))


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if _is_dtensor(t) else t).detach()
