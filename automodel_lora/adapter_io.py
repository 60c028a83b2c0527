"""Adapter files in HF PEFT's on-disk format, so PEFT, vLLM and the rest load them.

A directory holds:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 32, "target_modules": [...], ...}
    adapter_model.safetensors    base_model.model.<fqn>.lora_A.weight  (r, in_features)
                                 base_model.model.<fqn>.lora_B.weight  (out_features, r)
    automodel_lora_config.json   (optional) this library's full `PeftConfig`, which PEFT ignores

Each file is written to a temporary name, flushed to disk, then renamed, so a
crash never leaves a half-written adapter under the real name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from typing import Any

import torch
from torch import nn

from .config import PeftConfig
from .lora import lora_modules, patch_linear_module
from .recompute import recompute_mlp_inputs

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
LIBRARY_CONFIG_NAME = "automodel_lora_config.json"
PEFT_KEY_PREFIX = "base_model.model."

# `<prefix><fqn>.lora_A.weight`, also with PEFT's in-memory adapter name (`.lora_A.default.weight`).
_ADAPTER_KEY = re.compile(r"^(?P<fqn>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` under their FQNs (`<fqn>.lora_A.weight`, `<fqn>.lora_B.weight`).

    Sharded (FSDP2 `DTensor`) adapters are gathered to full tensors, which is a
    collective: call it on every rank.
    """
    state = {}
    for fqn, module in lora_modules(model):
        prefix = f"{fqn}." if fqn else ""
        state[f"{prefix}lora_A.weight"] = _full_tensor(module.lora_A.weight)
        state[f"{prefix}lora_B.weight"] = _full_tensor(module.lora_B.weight)
    return state


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    peft_config: PeftConfig | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write `model`'s adapters to the directory `path` in HF PEFT's format.

    Args:
        model: a model patched by `apply_lora_to_linear_modules` (or `patch_linear_module`).
        path: output directory (created if missing; files in it are replaced atomically).
        peft_config: the config the model was patched with; when given it is also
            stored as `automodel_lora_config.json`, so `load_adapter` restores the
            settings PEFT's format has no field for (`dropout_position`, `lora_dtype`...).
        base_model_name_or_path: written to the PEFT config; defaults to the
            model's `config._name_or_path` / `config.name_or_path` if it has one.

    Under `torch.distributed` the gather is collective and only rank 0 writes.

    Raises:
        ValueError: the model has no adapters.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to save; call apply_lora_to_linear_modules first")
    state = lora_state_dict(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {PEFT_KEY_PREFIX + key: t.detach().to("cpu").contiguous() for key, t in state.items()}
    _atomic_write(os.path.join(path, ADAPTER_WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    library_cfg_path = os.path.join(path, LIBRARY_CONFIG_NAME)
    if peft_config is not None:
        _atomic_write_json(library_cfg_path, peft_config.to_dict())
    elif os.path.exists(library_cfg_path):  # a stale one from an earlier save would be applied on load
        os.unlink(library_cfg_path)
    # The PEFT config goes last: its presence marks a complete adapter directory.
    _atomic_write_json(os.path.join(path, ADAPTER_CONFIG_NAME), peft_adapter_config(model, base_model_name_or_path))


def peft_adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` contents describing `model`'s adapters, as HF PEFT's `LoraConfig` writes it."""
    modules = lora_modules(model)
    ranks = Counter(m.lora_dim for _, m in modules)
    alphas = Counter(m.lora_alpha for _, m in modules)
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    dropouts = {m.lora_dropout.p for _, m in modules}
    rslora = {m.lora_use_rslora for _, m in modules}
    if len(rslora) > 1:
        raise ValueError("PEFT's format has one use_rslora flag per adapter, but this model mixes rsLoRA and plain LoRA")
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
        "target_modules": _target_module_names(model, [name for name, _ in modules]),
        "exclude_modules": None,
        "use_rslora": rslora.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {_exact(name): m.lora_dim for name, m in modules if m.lora_dim != rank},
        "alpha_pattern": {_exact(name): m.lora_alpha for name, m in modules if m.lora_alpha != alpha},
        "use_dora": False,
    }


def load_adapter(model: nn.Module, path: str | os.PathLike, use_triton: bool | None = None) -> int:
    """Load a PEFT-format LoRA adapter (ours or one trained with HF PEFT) into `model`.

    If `model` has no adapters yet it is frozen and patched from the file's
    config first (ranks from the tensors, `alpha_pattern`/`rank_pattern`
    honoured); otherwise its adapters must match the file one for one.

    Args:
        model: the base model (with or without adapters).
        path: directory holding `adapter_config.json` and `adapter_model.safetensors`.
        use_triton: kernel path for modules patched here; default: the saved
            `automodel_lora_config.json` if any, else True.

    Returns:
        The number of adapted modules loaded.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the adapter is not plain LoRA (DoRA, bias, modules_to_save...),
            or a key names no linear module, or a shape or name does not match
            (the message names the key).
    """
    peft_cfg = _read_json(os.path.join(path, ADAPTER_CONFIG_NAME))
    _check_supported(peft_cfg, path)
    library_cfg_path = os.path.join(path, LIBRARY_CONFIG_NAME)
    library_cfg = PeftConfig.from_dict(_read_json(library_cfg_path)) if os.path.exists(library_cfg_path) else None
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS_NAME} in {os.fspath(path)!r}")
    from safetensors.torch import load_file

    pairs = _group_adapter_tensors(load_file(weights_path), weights_path)
    modules = dict(model.named_modules())
    if not lora_modules(model):
        _patch_from_file(model, modules, pairs, peft_cfg, library_cfg, use_triton)
    adapted = dict(lora_modules(model))
    missing = sorted(set(adapted) - set(pairs))
    if missing:
        raise ValueError(
            f"{os.fspath(path)!r} holds no adapter for {len(missing)} adapted module(s) of the model, e.g. {missing[:5]}"
        )
    for fqn, (lora_A, lora_B) in pairs.items():
        module = adapted.get(fqn)
        if module is None:
            raise ValueError(
                f"adapter key {PEFT_KEY_PREFIX}{fqn}.lora_A.weight names {fqn!r}, which has no LoRA adapter in the model"
            )
        _check_scaling(module, fqn, peft_cfg, path)
        _copy_into(module.lora_A.weight, lora_A, f"{fqn}.lora_A.weight")
        _copy_into(module.lora_B.weight, lora_B, f"{fqn}.lora_B.weight")
    return len(pairs)


def _check_scaling(module, fqn: str, peft_cfg: dict[str, Any], path) -> None:
    """The file's alpha and rsLoRA flag for `fqn` must be the ones the patched module scales with."""
    alpha = _pattern_value(peft_cfg.get("alpha_pattern") or {}, fqn, peft_cfg["lora_alpha"])
    rslora = bool(peft_cfg.get("use_rslora", False))
    if float(alpha) != float(module.lora_alpha) or rslora != module.lora_use_rslora:
        raise ValueError(
            f"{os.fspath(path)!r} was trained with lora_alpha={alpha}, use_rslora={rslora} for {fqn!r}, but the "
            f"model's adapter there has lora_alpha={module.lora_alpha}, use_rslora={module.lora_use_rslora}; the "
            "outputs would be scaled differently. Load into an unpatched model (load_adapter patches it from the "
            "file) or patch with the file's values"
        )


def _patch_from_file(model, modules, pairs, peft_cfg, library_cfg, use_triton) -> None:
    for fqn in pairs:
        module = modules.get(fqn)
        if not isinstance(module, nn.Linear):
            what = "no such module" if module is None else f"a {type(module).__name__}, not a linear layer"
            raise ValueError(f"adapter key {PEFT_KEY_PREFIX}{fqn}.lora_A.weight names {fqn!r}: {what} in {type(model).__name__}")
    model.requires_grad_(False)
    for fqn, (lora_A, _) in pairs.items():
        patch_linear_module(
            modules[fqn],
            dim=lora_A.shape[0],
            alpha=_pattern_value(peft_cfg.get("alpha_pattern") or {}, fqn, peft_cfg["lora_alpha"]),
            dropout=library_cfg.dropout if library_cfg else float(peft_cfg.get("lora_dropout") or 0.0),
            # PEFT drops the adapter's input; keep that unless this library saved otherwise.
            dropout_position=library_cfg.dropout_position if library_cfg else "pre",
            lora_A_init_method=library_cfg.lora_A_init if library_cfg else "kaiming",
            lora_dtype=library_cfg.lora_dtype if library_cfg else None,
            use_triton=use_triton if use_triton is not None else (library_cfg.use_triton if library_cfg else True),
            use_rslora=bool(peft_cfg.get("use_rslora", False)),
        )
    if library_cfg is None or library_cfg.recompute_mlp_input:  # as apply_lora_to_linear_modules does
        recompute_mlp_inputs(model)


def _group_adapter_tensors(tensors: dict[str, torch.Tensor], source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _ADAPTER_KEY.match(key.removeprefix(PEFT_KEY_PREFIX))
        if match is None:
            raise ValueError(f"{source}: key {key!r} is not a LoRA lora_A/lora_B weight; only plain LoRA adapters are supported")
        halves.setdefault(match["fqn"], {})[match["which"]] = tensor
    pairs = {}
    for fqn, half in halves.items():
        if set(half) != {"A", "B"}:
            lacking = "lora_B" if "A" in half else "lora_A"
            raise ValueError(f"{source}: {fqn!r} has no {lacking}.weight (key {PEFT_KEY_PREFIX}{fqn}.{lacking}.weight)")
        lora_A, lora_B = half["A"], half["B"]
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise ValueError(
                f"{source}: {fqn!r} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}; "
                "expected (r, in_features) and (out_features, r)"
            )
        pairs[fqn] = (lora_A, lora_B)
    if not pairs:
        raise ValueError(f"{source} holds no adapter tensors")
    return pairs


def _check_supported(peft_cfg: dict[str, Any], path) -> None:
    if peft_cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{os.fspath(path)!r} holds a {peft_cfg['peft_type']} adapter; only LORA adapters can be loaded")
    unsupported = {
        "use_dora": "DoRA",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
        "modules_to_save": "modules_to_save (fully trained extra modules)",
        "lora_bias": "lora_bias",
    }
    for key, what in unsupported.items():
        if peft_cfg.get(key):
            raise ValueError(f"{os.fspath(path)!r}: {key}={peft_cfg[key]!r}; {what} is not supported, only plain LoRA")
    if peft_cfg.get("bias", "none") != "none":
        raise ValueError(f"{os.fspath(path)!r}: bias={peft_cfg['bias']!r}; only bias='none' adapters are supported")


def _copy_into(param: torch.Tensor, value: torch.Tensor, key: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise ValueError(f"adapter key {key!r}: the file has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
    with torch.no_grad():
        if _is_dtensor(param):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        param.copy_(value.to(param.dtype))


def _target_module_names(model: nn.Module, adapted: list[str]) -> list[str]:
    """Short names (`q_proj`) when they select exactly the adapted modules, as vLLM expects; else full FQNs."""
    short = {name.rsplit(".", 1)[-1] for name in adapted}
    selected_by_short = (
        {name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in short}
        - {f"{name}.lora_A" for name in adapted}
        - {f"{name}.lora_B" for name in adapted}
    )
    return sorted(short) if selected_by_short == set(adapted) else sorted(adapted)


def _pattern_value(patterns: dict[str, Any], fqn: str, default):
    """PEFT's rank/alpha_pattern lookup: the first pattern matching the FQN or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", fqn):
            return value
    return default


def _exact(fqn: str) -> str:
    return "^" + re.escape(fqn)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if _is_dtensor(t) else t).detach()


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} does not exist; an adapter directory needs {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    with open(path) as f:
        return json.load(f)


def _atomic_write(path: str, write) -> None:
    """Run `write(tmp_path)` into a temporary file beside `path`, fsync it, then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and safetensors) make 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (os.umask is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write_json(path: str, obj: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, write)
