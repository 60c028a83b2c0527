"""Checks and conversions for `PeftConfig`'s fields: dtypes by name, module-name lists, layer selection,
did-you-mean hints for unknown keys."""

from __future__ import annotations

import difflib
import re

import torch

from .matcher import validate_pattern

# Names accepted wherever a dtype is written as a string (YAML, adapter files).
_DTYPES_BY_NAME = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def dtype_from_str(name: str | torch.dtype | None, field_name: str = "dtype") -> torch.dtype | None:
    """Turn `"bf16"`, `"torch.bfloat16"`, `torch.bfloat16` or None into a `torch.dtype` (or None).

    Raises:
        ValueError: the string names no floating dtype this library trains in.
    """
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        if name not in _DTYPES_BY_NAME.values():
            raise ValueError(f"{field_name}={name} is not a dtype adapters train in; use one of {sorted(_DTYPES_BY_NAME)}")
        return name
    if not isinstance(name, str):
        raise ValueError(f"{field_name}={name!r} must be a torch.dtype or one of {sorted(_DTYPES_BY_NAME)}")
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPES_BY_NAME:
        raise ValueError(f"{field_name}={name!r} is not a known dtype; use one of {sorted(_DTYPES_BY_NAME)}")
    return _DTYPES_BY_NAME[key]


def dtype_to_str(dtype: torch.dtype | None) -> str | None:
    """`torch.bfloat16` -> `"bfloat16"` (None stays None)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


def as_name_list(value, field_name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set)):
        raise ValueError(
            f"PeftConfig.{field_name} must be a list of module names or patterns, got {value!r} "
            f"({type(value).__name__}); e.g. {field_name}=['q_proj', 'v_proj']"
        )
    value = list(value)
    for item in value:
        if not isinstance(item, str) or not item:
            raise ValueError(f"PeftConfig.{field_name} must be a list of non-empty strings, got item {item!r}")
        try:
            validate_pattern(item)
        except ValueError as e:
            raise ValueError(f"PeftConfig.{field_name}: {e}") from None
    return value


def check_modules_to_save(value, target_modules: list[str]) -> list[str]:
    """`PeftConfig.modules_to_save` checked: plain module names (no glob), none also in `target_modules`.

    Raises:
        ValueError: not a list of non-empty strings, a glob, or an entry also in `target_modules`.
    """
    names = as_name_list(value, "modules_to_save")
    for name in names:
        if re.search(r"[*?\[]", name):
            raise ValueError(
                f"PeftConfig.modules_to_save entry {name!r} is a pattern; give module names (the FQN or a dotted "
                "suffix of it, e.g. 'score' or 'lm_head'), as HF PEFT does"
            )
    both = sorted(set(names) & set(target_modules))
    if both:
        raise ValueError(
            f"PeftConfig: {both} are in both target_modules and modules_to_save; a module is either adapted or "
            "trained fully, not both (HF PEFT refuses it too). Remove them from one of the lists"
        )
    return names


def check_layer_selection(layers, pattern) -> tuple[list[int] | int | None, list[str] | str | None]:
    """`PeftConfig.layers_to_transform` / `layers_pattern` checked (tuples become lists).

    Raises:
        ValueError: not layer indices / names, a bad regex, or `layers_pattern` without `layers_to_transform`.
    """
    if isinstance(layers, tuple):
        layers = list(layers)
    ok_index = lambda i: isinstance(i, int) and not isinstance(i, bool) and i >= 0  # noqa: E731
    if not (layers is None or ok_index(layers) or (isinstance(layers, list) and all(map(ok_index, layers)))):
        raise ValueError(
            f"PeftConfig.layers_to_transform must be a layer index or a list of them (integers >= 0), "
            f"got {layers!r}; e.g. layers_to_transform=[0, 1]"
        )
    if isinstance(pattern, tuple):
        pattern = list(pattern)
    if not (pattern is None or isinstance(pattern, str) or
            (isinstance(pattern, list) and all(isinstance(p, str) and p for p in pattern))):
        raise ValueError(
            f"PeftConfig.layers_pattern must be the name of the module list holding the layers (e.g. 'layers', "
            f"'h') or a list of names, got {pattern!r}"
        )
    if pattern and (layers is None or layers == []):
        raise ValueError(
            f"PeftConfig.layers_pattern={pattern!r} needs layers_to_transform (the layer indices to adapt), "
            "as in HF PEFT"
        )
    for p in [pattern] if isinstance(pattern, str) else pattern or []:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"PeftConfig.layers_pattern {p!r} is not a valid regular expression ({e})") from None
    return layers, pattern


def did_you_mean(unknown: list[str], valid: list[str]) -> str:
    """` (did you mean 'rank' -> 'dim'?)` for the unknown keys that have a close valid one, else ``."""
    hints = []
    for key in unknown:
        close = {"rank": ["dim"]}.get(key) or difflib.get_close_matches(key, valid, n=1)
        if close:
            hints.append(f"{key!r} -> {close[0]!r}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""
