r"""Reading an adapter directory's files and refusing what is wrong in them, before a model is touched.

`read_adapter_config` turns `adapter_config.json` into checked values (HF PEFT's names: `r`,
`lora_alpha`, `use_rslora`, `alpha_pattern`, ...); `check_tensors_fit_config` checks it against the weights
file's pairs (ranks, selected modules), which `adapter_weights.read_adapter_file` reads. Every
problem with a file's content is an `AdapterFormatError` naming the file, the key and what to fix.

PEFT's rules, as `peft.tuners.tuners_utils.check_target_module_exists` and `get_pattern_key` apply them
to a module name (the FQN in the base model): `target_modules` as one string is a regex that must match
the whole name (`re.fullmatch`); as a list, an entry matches the name itself or a dotted suffix of it,
and a suffix match is then narrowed by `layers_to_transform` / `layers_pattern` (the module's layer
index, `matcher.layer_index`, must be listed); `exclude_modules` the same as targets, and it wins;
`rank_pattern` / `alpha_pattern` keys are regexes matched against the name or a dotted suffix
(`(.*\.)?(key)$`), the first matching key giving the value.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .matcher import in_layers, pattern_key, pattern_key_regex
from .modules_to_save import read_modules_to_save

PEFT_KEY_PREFIX = "base_model.model."

# `fan_in_fan_out` is not here: as in PEFT, the module's type decides (a transformers `Conv1D` stores its weight
# `(in, out)`, a linear `(out, in)`) and the adapter tensors have the same shapes either way.
_UNSUPPORTED = {
    "layer_replication": "layer_replication (a model with repeated layers)",
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
        r: the default rank (a positive integer), or None where the file has no `r`.
        lora_alpha: the default alpha (positive).
        use_rslora: scale by `alpha / sqrt(r)`.
        lora_dropout: dropout probability in `[0, 1)`.
        rank_pattern: regex -> rank for modules whose rank differs (PEFT's lookup).
        alpha_pattern: regex -> alpha for modules whose alpha differs (PEFT's lookup).
        target_modules: PEFT's `target_modules`: a list of names, one regex string (full match), or None.
        exclude_modules: the same for `exclude_modules`.
        layers_to_transform: PEFT's layer indices (an int or a list; None: every layer).
        layers_pattern: PEFT's name(s) of the module list holding the layers, or None.
        modules_to_save: PEFT's names of fully trained modules (a list; None: none).
        lora_bias: PEFT's `lora_bias`: every `lora_B` has a bias (`<fqn>.lora_B.bias` in the weights file).
        use_dora: PEFT's `use_dora`: every module has a DoRA magnitude (`<fqn>.lora_magnitude_vector`).
        target_parameters: PEFT's `target_parameters`: expert weights with adapters (see `experts_io`).
    """

    path: str
    r: int | None
    lora_alpha: float
    use_rslora: bool
    lora_dropout: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str] | str | None
    exclude_modules: list[str] | str | None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    lora_bias: bool = False
    use_dora: bool = False
    target_parameters: tuple[str, ...] = ()

    def alpha_for(self, fqn: str) -> float:
        """PEFT's alpha_pattern lookup: the first pattern matching the FQN or a dotted suffix of it."""
        pattern = pattern_key(self.alpha_pattern, fqn)
        return self.lora_alpha if pattern is None else self.alpha_pattern[pattern]

    def rank_for(self, fqn: str) -> tuple[int | None, str]:
        """`(rank, key)`: the rank PEFT gives `fqn` (`rank_pattern`, else `r`; None if neither) and the config
        key it came from (`"rank_pattern['<pattern>']"` or `"r"`)."""
        pattern = pattern_key(self.rank_pattern, fqn)
        if pattern is None:
            return self.r, "r"
        return self.rank_pattern[pattern], f"rank_pattern[{pattern!r}]"

    def selects(self, fqn: str) -> bool | None:
        """Whether PEFT would put an adapter on the module `fqn` (`target_modules` selects it and
        `exclude_modules` does not); None where `target_modules` is None or `"all-linear"`, which this
        rule cannot decide without the model."""
        if self.target_modules is None or self.target_modules == "all-linear":
            return None
        if self.exclude_modules and peft_selects(self.exclude_modules, fqn):
            return False
        return peft_selects(self.target_modules, fqn, self.layers_to_transform, self.layers_pattern)


def peft_selects(targets: list[str] | str, fqn: str, layers_to_transform: list[int] | int | None = None,
                 layers_pattern: list[str] | str | None = None) -> bool:
    """HF PEFT's `target_modules` / `exclude_modules` rule (`check_target_module_exists`): one string is a
    regex matched against the whole FQN (`re.fullmatch`); a list matches the FQN itself, or a dotted suffix
    of it when the module also lies in `layers_to_transform` (if given)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, fqn) is not None
    if fqn in targets:
        return True
    return any(fqn.endswith("." + t) for t in targets) and in_layers(fqn, layers_to_transform, layers_pattern)


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


def _rank(path: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(
            f"{path!r}: {key}={value!r} is not allowed; it must be a positive integer rank written as a JSON "
            f"integer (e.g. 8, not \"8\", 8.0 or true)"
        )
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
            pattern_key_regex(pattern)
        except re.error as e:
            raise AdapterFormatError(
                f"{path!r}: {key} key {pattern!r} is not a valid regular expression ({e}); fix or remove it"
            ) from None
        if integer:
            _rank(path, f"{key}[{pattern!r}]", v)
        else:
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


def _layer_selection(path: str, raw: dict[str, Any]) -> tuple[list[int] | int | None, list[str] | str | None]:
    """`(layers_to_transform, layers_pattern)`, empty values (PEFT treats them as absent) as None."""
    layers, pattern = raw.get("layers_to_transform"), raw.get("layers_pattern")
    ok_index = lambda i: isinstance(i, int) and not isinstance(i, bool) and i >= 0  # noqa: E731
    if layers == []:
        layers = None
    if not (layers is None or ok_index(layers) or (isinstance(layers, list) and all(map(ok_index, layers)))):
        raise AdapterFormatError(
            f"{path!r}: layers_to_transform={layers!r} must be a layer index or a list of them (JSON integers >= 0), "
            "or null for every layer"
        )
    if pattern in ("", []):
        pattern = None
    names = isinstance(pattern, list) and all(isinstance(p, str) for p in pattern)
    if not (pattern is None or isinstance(pattern, str) or names):
        raise AdapterFormatError(
            f"{path!r}: layers_pattern={pattern!r} must be the name of the module list holding the layers (e.g. "
            '"layers"), a list of names, or null'
        )
    for p in [pattern] if isinstance(pattern, str) else pattern or []:
        try:
            re.compile(p)
        except re.error as e:
            raise AdapterFormatError(f"{path!r}: layers_pattern {p!r} is not a valid regular expression ({e})") from None
    if pattern is not None and raw.get("layers_to_transform") is None:  # HF PEFT's LoraConfig refuses it too
        raise AdapterFormatError(
            f"{path!r}: layers_pattern={pattern!r} needs layers_to_transform (the layer indices); set both, or "
            '"layers_pattern": null'
        )
    if pattern is not None and isinstance(raw.get("target_modules"), str):
        raise AdapterFormatError(
            f"{path!r}: layers_pattern={pattern!r} cannot narrow a target_modules regex string (HF PEFT refuses it "
            'too); write target_modules as a list of names, or set "layers_pattern": null'
        )
    return layers, pattern


def read_adapter_config(path: str) -> AdapterConfig:
    """Read and check an `adapter_config.json` (HF PEFT's `LoraConfig` fields).

    Raises:
        FileNotFoundError: no such file.
        AdapterFormatError: unreadable JSON, not an object, not LoRA / DoRA (bias,
            layer_replication...), a `lora_bias` or `use_dora` that is not a JSON boolean, a
            `layers_to_transform` that is not layer indices or a `layers_pattern` that is not names, `r` not a
            positive JSON integer, `lora_alpha` missing or not a positive number,
            `use_rslora` not a JSON boolean, a bad `alpha_pattern` / `rank_pattern` regex or a value that
            is not a positive number (alpha) / positive integer (rank), a `target_modules` /
            `exclude_modules` that is neither a list of names nor one valid regex, or a `lora_dropout`
            outside `[0, 1)`, or a `modules_to_save` that is not a list of names.
    """
    raw = read_json_object(path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{path!r} holds a {raw['peft_type']!r} adapter; only LORA adapters can be loaded")
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise AdapterFormatError(f"{path!r}: {key}={raw[key]!r}; {what} is not supported, only LoRA and DoRA")
    layers_to_transform, layers_pattern = _layer_selection(path, raw)
    if raw.get("bias", "none") != "none":
        raise AdapterFormatError(f"{path!r}: bias={raw['bias']!r}; only bias='none' adapters are supported")
    if "lora_alpha" not in raw:
        raise AdapterFormatError(
            f"{path!r} has no \"lora_alpha\"; add the alpha the adapter was trained with (the outputs are scaled by "
            "lora_alpha / r)"
        )
    alpha = _number(path, "lora_alpha", raw["lora_alpha"], positive=True, what="a positive number (scale = lora_alpha / r)")
    rank = None if raw.get("r") is None else _rank(path, "r", raw["r"])
    dropout = raw.get("lora_dropout")
    dropout = 0.0 if dropout is None else _number(path, "lora_dropout", dropout, positive=False, what="a number in [0, 1)")
    if not 0.0 <= dropout < 1.0:
        raise AdapterFormatError(f"{path!r}: lora_dropout={dropout!r} must be a probability in [0, 1)")
    return AdapterConfig(
        path=path,
        r=rank,
        lora_alpha=alpha,
        use_rslora=_flag(path, "use_rslora", raw.get("use_rslora")),
        lora_dropout=float(dropout),
        rank_pattern=_patterns(path, "rank_pattern", raw.get("rank_pattern"), integer=True),
        alpha_pattern=_patterns(path, "alpha_pattern", raw.get("alpha_pattern"), integer=False),
        target_modules=_module_names(path, "target_modules", raw.get("target_modules")),
        exclude_modules=_module_names(path, "exclude_modules", raw.get("exclude_modules")),
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        modules_to_save=read_modules_to_save(path, raw.get("modules_to_save")),
        lora_bias=_flag(path, "lora_bias", raw.get("lora_bias")),
        use_dora=_flag(path, "use_dora", raw.get("use_dora")),
        target_parameters=_parameter_names(path, raw.get("target_parameters")),
    )


def _parameter_names(path: str, value: Any) -> tuple[str, ...]:
    """PEFT's `target_parameters`: a list of names (None or missing: none)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterFormatError(f"{path!r}: target_parameters={value!r} must be a list of parameter names "
                                 "('mlp.experts.gate_up_proj')")
    return tuple(value)


def check_tensors_fit_config(config: AdapterConfig, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                             weights_path: str) -> None:
    """The tensors must be the adapter the config describes, as PEFT would build it: each module's rank is
    the one `r` / `rank_pattern` give it (else the scale `alpha / r` would not be the trained one), and
    each module is one that `target_modules` / `exclude_modules` select (else PEFT would not load it).

    Raises:
        AdapterFormatError: naming the config file, its key, the module and the tensor key.
    """
    for fqn, (lora_A, _) in pairs.items():
        key = f"{PEFT_KEY_PREFIX}{fqn}.lora_A.weight"
        rank, rank_key = config.rank_for(fqn)
        if rank is not None and rank != lora_A.shape[0]:
            raise AdapterFormatError(
                f"{config.path!r}: {rank_key}={rank} is the rank of {fqn!r}, but {weights_path} holds "
                f"{key} of shape {tuple(lora_A.shape)} (rank {lora_A.shape[0]}); the scale lora_alpha / r would "
                "not be the one it was trained with. Fix r / rank_pattern, or save the adapter again"
            )
        if config.selects(fqn) is False:
            what = ("exclude_modules" if config.exclude_modules and peft_selects(config.exclude_modules, fqn)
                    else "target_modules")
            raise AdapterFormatError(
                f"{config.path!r}: {what}={getattr(config, what)!r} does not select {fqn!r} (HF PEFT's rule: one "
                f"string is a full-match regex, a list entry matches the name or a dotted suffix), but "
                f"{weights_path} holds {key}; PEFT would not load it. Fix {what}, or save the adapter again"
            )
