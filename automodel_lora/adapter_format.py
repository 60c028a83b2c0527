"""Reading an adapter directory's files and refusing what is wrong in them, before a model is touched.

`read_adapter_config` turns `adapter_config.json` into checked values (HF PEFT's names: `r`,
`lora_alpha`, `use_rslora`, `alpha_pattern`, ...); `read_adapter_tensors` groups
`adapter_model.safetensors` into `(lora_A, lora_B)` pairs per module FQN and checks them. Every
problem with a file's content is an `AdapterFormatError` naming the file, the key and what to fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

PEFT_KEY_PREFIX = "base_model.model."

# `<prefix><fqn>.lora_A.weight`, also with PEFT's in-memory adapter name (`.lora_A.default.weight`).
_ADAPTER_KEY = re.compile(r"^(?P<fqn>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")

_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "lora_bias",
}


class AdapterFormatError(ValueError):
    """An adapter file (`adapter_config.json`, `adapter_model.safetensors`, `automodel_lora_config.json`)
    that cannot be loaded as it is, or that does not fit the model: the message names the file, the key
    and what to fix."""


@dataclass(frozen=True)
class AdapterConfig:
    """The checked fields of an `adapter_config.json` that loading uses.

    Attributes:
        path: the file.
        lora_alpha: the default alpha (positive).
        use_rslora: scale by `alpha / sqrt(r)`.
        lora_dropout: dropout probability in `[0, 1)`.
        alpha_pattern: regex -> alpha for modules whose alpha differs (PEFT's lookup).
        target_modules: PEFT's `target_modules`: a list of names, one regex string, or None.
        exclude_modules: the same for `exclude_modules`.
        selects_by_layer: `layers_to_transform` / `layers_pattern` narrow the targets.
    """

    path: str
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    exclude_modules: list[str] | str | None
    selects_by_layer: bool

    def alpha_for(self, fqn: str) -> float:
        """PEFT's alpha_pattern lookup: the first pattern matching the FQN or a dotted suffix of it."""
        return pattern_value(self.alpha_pattern, fqn, self.lora_alpha)


def pattern_value(patterns: dict[str, Any], fqn: str, default):
    """PEFT's rank/alpha_pattern lookup: the first pattern matching the FQN or a dotted suffix of it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", fqn):
            return value
    return default


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON file's top-level object.

    Raises:
        FileNotFoundError: no such file.
        AdapterFormatError: not UTF-8, not valid JSON, nested too deep, or not an object.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} does not exist; an adapter directory needs adapter_config.json and adapter_model.safetensors"
        )
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError as e:
        raise AdapterFormatError(f"{path!r} is not UTF-8 text ({e}); write it again as a JSON object") from None
    except json.JSONDecodeError as e:
        raise AdapterFormatError(
            f"{path!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; fix that spot or save the "
            "adapter again"
        ) from None
    except RecursionError:
        raise AdapterFormatError(f"{path!r} is nested too deeply to read; an adapter config is a flat JSON object") from None
    if not isinstance(value, dict):
        raise AdapterFormatError(
            f"{path!r} holds a JSON {type(value).__name__}, not an object; it must be an object such as "
            '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
        )
    return value


def _number(path: str, key: str, value: Any, *, positive: bool, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        positive and value <= 0
    ):
        raise AdapterFormatError(f"{path!r}: {key}={value!r} is not allowed; it must be {what}")
    return value


def _flag(path: str, key: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AdapterFormatError(
            f'{path!r}: {key}={value!r} must be the JSON literal true or false (no quotes); write "{key}": false '
            f'or "{key}": true'
        )
    return value


def _patterns(path: str, key: str, value: Any, *, integer: bool) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{path!r}: {key} must be an object of regex -> value, got {value!r}")
    for pattern, v in value.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except re.error as e:
            raise AdapterFormatError(
                f"{path!r}: {key} key {pattern!r} is not a valid regular expression ({e}); fix or remove it"
            ) from None
        if integer and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise AdapterFormatError(f"{path!r}: {key}[{pattern!r}]={v!r} must be a positive integer rank")
        if not integer:
            _number(path, f"{key}[{pattern!r}]", v, positive=True, what="a positive number (the alpha for those modules)")
    return dict(value)


def _module_names(path: str, key: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as e:
                raise AdapterFormatError(f"{path!r}: {key}={value!r} is not a valid regular expression ({e})") from None
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdapterFormatError(f"{path!r}: {key} must be a list of module names or one regex string, got {value!r}")
    return value


def read_adapter_config(path: str) -> AdapterConfig:
    """Read and check an `adapter_config.json` (HF PEFT's `LoraConfig` fields).

    Raises:
        FileNotFoundError: no such file.
        AdapterFormatError: unreadable JSON, not an object, not plain LoRA (DoRA, bias, modules_to_save...),
            `lora_alpha` missing or not a positive number, `use_rslora` not a JSON boolean, a bad
            `alpha_pattern` / `rank_pattern` regex or value, or a `lora_dropout` outside `[0, 1)`.
    """
    raw = read_json_object(path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{path!r} holds a {raw['peft_type']!r} adapter; only LORA adapters can be loaded")
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise AdapterFormatError(f"{path!r}: {key}={raw[key]!r}; {what} is not supported, only plain LoRA")
    if raw.get("bias", "none") != "none":
        raise AdapterFormatError(f"{path!r}: bias={raw['bias']!r}; only bias='none' adapters are supported")
    if "lora_alpha" not in raw:
        raise AdapterFormatError(
            f"{path!r} has no \"lora_alpha\"; add the alpha the adapter was trained with (the outputs are scaled by "
            "lora_alpha / r)"
        )
    alpha = _number(path, "lora_alpha", raw["lora_alpha"], positive=True, what="a positive number (scale = lora_alpha / r)")
    _patterns(path, "rank_pattern", raw.get("rank_pattern"), integer=True)
    dropout = raw.get("lora_dropout")
    dropout = 0.0 if dropout is None else _number(path, "lora_dropout", dropout, positive=False, what="a number in [0, 1)")
    if not 0.0 <= dropout < 1.0:
        raise AdapterFormatError(f"{path!r}: lora_dropout={dropout!r} must be a probability in [0, 1)")
    return AdapterConfig(
        path=path,
        lora_alpha=alpha,
        use_rslora=_flag(path, "use_rslora", raw.get("use_rslora")),
        lora_dropout=float(dropout),
        alpha_pattern=_patterns(path, "alpha_pattern", raw.get("alpha_pattern"), integer=False),
        target_modules=_module_names(path, "target_modules", raw.get("target_modules")),
        exclude_modules=_module_names(path, "exclude_modules", raw.get("exclude_modules")),
        selects_by_layer=raw.get("layers_to_transform") is not None or raw.get("layers_pattern") is not None,
    )


def read_adapter_tensors(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`adapter_model.safetensors` as `{fqn: (lora_A (r, in), lora_B (out, r))}`, every tensor checked.

    Raises:
        FileNotFoundError: no such file.
        AdapterFormatError: not a safetensors file, a key that is not a lora_A/lora_B weight, a half
            missing, shapes that do not pair, a tensor that is not floating point, or one holding NaN/Inf.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist; an adapter directory needs adapter_model.safetensors")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFormatError(f"{path!r} is not a readable safetensors file ({e}); save the adapter again") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _ADAPTER_KEY.match(key.removeprefix(PEFT_KEY_PREFIX))
        if match is None:
            raise AdapterFormatError(
                f"{path}: key {key!r} is not a LoRA lora_A/lora_B weight; only plain LoRA adapters are supported"
            )
        _check_values(path, key, tensor)
        halves.setdefault(match["fqn"], {})[match["which"]] = tensor
    pairs = {}
    for fqn, half in halves.items():
        if set(half) != {"A", "B"}:
            lacking = "lora_B" if "A" in half else "lora_A"
            raise AdapterFormatError(f"{path}: {fqn!r} has no {lacking}.weight (key {PEFT_KEY_PREFIX}{fqn}.{lacking}.weight)")
        lora_A, lora_B = half["A"], half["B"]
        if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
            raise AdapterFormatError(
                f"{path}: {fqn!r} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}; "
                "expected (r, in_features) and (out_features, r)"
            )
        pairs[fqn] = (lora_A, lora_B)
    if not pairs:
        raise AdapterFormatError(f"{path} holds no adapter tensors")
    return pairs


def _check_values(path: str, key: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise AdapterFormatError(
            f"{path}: {key!r} is {tensor.dtype}; adapter weights are floating point (float32, float16, bfloat16)"
        )
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise AdapterFormatError(
            f"{path}: {key!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}; the adapter was saved from a diverged "
            "run. Load an earlier checkpoint's adapter"
        )
