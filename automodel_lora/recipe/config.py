"""Recipe configuration: reading a recipe YAML, dotted overrides, and the validated ``RecipeConfig``.

The sections a recipe has (``model``, ``peft``, ``quantization``, ``data``, ``train``, ``checkpoint``,
``distributed``) and what each key means are in ``recipe.sections``; their dataclasses are
re-exported here, so ``from automodel_lora.recipe.config import TrainConfig`` keeps working.

Command-line overrides use dotted keys whose values are parsed as YAML; a key may reach into a
mapping (``model.tiny.hidden_size=64``, ``peft.kernels.base_gemm=cublas``)::

    peft.dim=16 train.max_steps=50 train.lr=1e-4 peft.target_modules=[q_proj,v_proj]

YAML is read with YAML 1.2 floats (``1e-4`` is a number; PyYAML's YAML 1.1 reads it as a string),
so values arrive typed. The only conversions left are the ones YAML cannot make: an integer where
a float is declared, a whole float (``2.0``) where an integer is, a number where a string is.

Relative ``data.path`` / ``data.validation_path`` / ``data.tokenizer`` / ``model.name_or_path``
values written *in a YAML file* are resolved against that file's directory (so a recipe works
from any working directory); values given on the command line are relative to the current
directory. ``checkpoint.output_dir`` is always relative to the current directory.

Every problem is a ``ConfigError`` (a ``ValueError``) whose message names the key or file, the bad
value and what is allowed; the command line prints it and exits with code 2.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import PEFT_ALIASES, PeftConfig
from .errors import ConfigError
from .sections import (
    SECTIONS,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    ModelConfig,
    QuantizationConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "QuantizationConfig",
    "DataConfig",
    "TrainConfig",
    "CheckpointConfig",
    "DistributedConfig",
    "RecipeConfig",
    "SECTIONS",
    "load_recipe",
    "apply_overrides",
    "parse_override",
    "read_utf8_file",
]


# --------------------------------------------------------------------------------------------
# Reading YAML and text
# --------------------------------------------------------------------------------------------


class _YamlLoader(yaml.SafeLoader):
    """``SafeLoader`` that also reads YAML 1.2 floats without a dot (``1e-4``, ``5E3``) as floats."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _read_yaml(text: str, bad: str) -> Any:
    """``text`` parsed as YAML; ``bad`` opens the error message (``"r.yaml: not valid YAML"``)."""
    try:
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: builds no Python objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{bad}: {e}") from e
    except RecursionError as e:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{bad}: nested too deep to read; flatten the nesting") from e


def read_utf8_file(path: str | os.PathLike, not_found: str, unreadable: str) -> str:
    """The text of the UTF-8 file ``path``.

    Raises:
        ConfigError: ``not_found`` where there is no such file; ``unreadable`` with the OS's reason where it
            cannot be read; bytes that are not UTF-8 (see :func:`decode_utf8`).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(not_found)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{unreadable}: {e.strerror}") from e
    return decode_utf8(data, path)


def decode_utf8(data: bytes, path: str | os.PathLike) -> str:
    """Decode ``data``, the bytes of the file ``path``, as UTF-8.

    Raises:
        ConfigError: a byte sequence that is not UTF-8, naming the file, the 1-based line and column.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Lines end at \n, \r\n or a lone \r, as Python's text files and YAML count them.
        before = data[: e.start]
        line = 1 + before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n")
        column = e.start - max(before.rfind(b"\n"), before.rfind(b"\r"))
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); "
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


# --------------------------------------------------------------------------------------------
# Building a section from a mapping
# --------------------------------------------------------------------------------------------

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """``value`` as the annotated field type ``tp`` (a plain type or a union), or a ConfigError naming ``key``.

    YAML has already typed ``value``; this converts only what YAML can't: int -> float,
    a whole float -> int, a number -> str. Annotations other than the six YAML kinds pass
    through for the dataclass to check.
    """
    union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    kinds = typing.get_args(tp) if union else (tp,)
    if value is None and type(None) in kinds:
        return None
    kinds = tuple(typing.get_origin(k) or k for k in kinds if k is not type(None))
    if not all(k in _KIND_WORDS for k in kinds):
        return value
    for k in kinds:  # an exact kind wins: `true` stays a bool in `bool | str`, and a bool is no int
        if isinstance(value, k) and (k is bool or not isinstance(value, bool)):
            return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and float in kinds:
        return float(value)
    if number and int in kinds and float(value).is_integer():
        return int(value)
    if number and str in kinds:
        return str(value)
    expected = " | ".join("null" if k is type(None) else k.__name__ for k in typing.get_args(tp))
    raise ConfigError(f"`{key}` must be {expected if union else _KIND_WORDS[tp]}, got {value!r}")


def _mapping(raw: Any, section: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section `{section}` must be a mapping of keys to values, got {raw!r}")
    return raw


def _build_section(cls: type, raw: Any, section: str):
    """Build dataclass ``cls`` from mapping ``raw``; an unknown key raises naming the valid ones."""
    raw = _mapping(raw, section)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        raise ConfigError(f"unknown key `{section}.{unknown[0]}`; valid keys for `{section}` are: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _check_type(v, hints[k], f"{section}.{k}") for k, v in raw.items()})


def _build_peft(cls: type[PeftConfig], raw: Any, section: str) -> PeftConfig:
    """``PeftConfig`` from the ``peft:`` mapping (it checks its own keys and values); its errors
    become ConfigErrors that name the keys as a recipe writes them (``peft.dim``)."""
    raw = _mapping(raw, section)
    try:
        return cls.from_dict(raw)
    except (ValueError, TypeError) as e:
        msg = str(e).replace("PeftConfig.", f"{section}.")
        raise ConfigError(msg if section in msg.lower() else f"[{section}] {msg}") from e


# --------------------------------------------------------------------------------------------
# The whole recipe
# --------------------------------------------------------------------------------------------


@dataclass
class RecipeConfig:
    """A whole recipe: one attribute per section."""

    model: ModelConfig
    peft: PeftConfig
    quantization: QuantizationConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    distributed: DistributedConfig
    source: str | None = None  # the YAML file it came from (informational)

    @classmethod
    def from_dict(cls, raw: dict, source: str | None = None) -> RecipeConfig:
        """Validate a nested mapping (as read from YAML) into a RecipeConfig.

        Raises:
            ConfigError: an unknown section or key, a bad type or value.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"a recipe must be a mapping of sections, got {type(raw).__name__}")
        unknown = [k for k in raw if k not in SECTIONS]
        if unknown:
            raise ConfigError(f"unknown section `{unknown[0]}`; valid sections are: {', '.join(SECTIONS)}")
        if raw.get("data") is None:
            raise ConfigError("the `data` section is required (at least `data.path`)")
        if raw.get("model") is None:
            raise ConfigError("the `model` section is required (`model.name_or_path` or `model.tiny`)")
        sections = {}
        for name, scls in SECTIONS.items():
            build = _build_peft if scls is PeftConfig else _build_section
            sections[name] = build(scls, raw.get(name), name)
        cfg = cls(**sections, source=source)
        cfg._cross_validate()
        return cfg

    def _cross_validate(self) -> None:
        if self.quantization.load_in_4bit and self.distributed.strategy == "fsdp2":
            raise ConfigError(
                "`distributed.strategy: fsdp2` does not support a 4-bit base "
                "(`quantization.load_in_4bit: true`); use `distributed.strategy: ddp`"
            )
        if self.model.tiny is not None and self.data.tokenizer is None:
            raise ConfigError("`model.tiny` has no tokenizer of its own: set `data.tokenizer: byte` (or a tokenizer directory)")
        if self.data.adapters is not None:
            self._check_multi_adapter()

    def _check_multi_adapter(self) -> None:
        """What training several adapters in one batch needs (``data.adapters``)."""
        p, why = self.peft, None
        if self.train.max_steps is None:
            why = "set `train.max_steps` (each adapter's data has its own length, so epochs name no common end)"
        elif p.dropout:
            why = f"`peft.dropout: {p.dropout}`: mixed batches train without dropout (set it to 0)"
        elif p.adapts_experts:
            why = "`peft.target_parameters` / `match_all_experts`: a model's experts take one adapter"
        elif p.modules_to_save:
            why = "`peft.modules_to_save`: fully trained modules belong to one adapter"
        elif self.train.compile:
            why = "`train.compile: true`: mixed batches run eagerly (`train.cuda_graphs: true` replays them instead)"
        elif self.train.fused_loss == "liger":  # auto resolves to the plain loss with data.adapters
            why = "`train.fused_loss: liger`: each adapter's loss is taken from its rows of the logits (set it to false)"
        if why:
            raise ConfigError(f"`data.adapters` (several adapters at once): {why}")

    def to_dict(self) -> dict:
        """A plain nested dict (YAML-serialisable) with every field, defaults included."""
        out = {}
        for name in SECTIONS:
            sec = getattr(self, name)
            out[name] = sec.to_dict() if name == "peft" else dataclasses.asdict(sec)
        return out

    def to_yaml(self) -> str:
        """``to_dict`` as block-style YAML, sections in order (what ``--print-config`` prints)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], value parsed as YAML); an empty value is null.

    Raises:
        ConfigError: no ``=``, a key that is not dotted, or a value that is not YAML.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like `section.key=value` (e.g. train.max_steps=50)")
    key, _, text = item.partition("=")
    key = key.strip().lstrip("-")
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override key {key!r} must be dotted as `section.key` (e.g. peft.dim=16)")
    return parts, _read_yaml(text, f"override {item!r}: value is not valid YAML") if text.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a deep copy of ``raw`` with dotted ``key=value`` overrides applied.

    A key may reach into a mapping (``peft.kernels.base_gemm=cublas``): missing levels are
    created, siblings are kept. An override of one of two exclusive keys drops the other
    (``train.max_steps=50`` over a file's ``train.epochs``; the same for the warmup pair).
    Section names are checked here; keys within a section are checked when the section is
    built (so the error lists that section's valid keys).

    Raises:
        ConfigError: a malformed override or an unknown section.
    """
    raw = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        parts, value = parse_override(item)
        if parts[0] not in SECTIONS:
            raise ConfigError(
                f"override `{'.'.join(parts)}`: unknown section `{parts[0]}`; valid sections are: {', '.join(SECTIONS)}"
            )
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        if parts[0] == "peft" and len(parts) == 2:  # an override replaces the other spelling of its field
            for name in _other_spellings(parts[1]):
                node.pop(name, None)
        if value is not None:  # and the file's value of a key it excludes (max_steps over epochs)
            for name in _EXCLUSIVE.get(".".join(parts), ()):
                node.pop(name, None)
        node[parts[-1]] = value
    return raw


# Keys that exclude each other: setting one on the command line drops the other from the file.
_EXCLUSIVE = {
    "train.max_steps": ("epochs",),
    "train.epochs": ("max_steps",),
    "train.warmup_steps": ("warmup_ratio",),
    "train.warmup_ratio": ("warmup_steps",),
}


def _other_spellings(key: str) -> list[str]:
    """The other names of a ``peft`` field: ``r`` for ``dim`` and back (HF PEFT's aliases)."""
    names = {key, PEFT_ALIASES.get(key, key)} | {alias for alias, name in PEFT_ALIASES.items() if name == key}
    return sorted(names - {key})


_YAML_RELATIVE_PATHS = (("data", "path"), ("data", "validation_path"), ("data", "tokenizer"), ("model", "name_or_path"))


def _resolve_yaml_paths(raw: dict, base: Path) -> None:
    """Make relative paths written in a YAML file relative to that file's directory (``data.adapters``' too)."""
    adapters = raw.get("data", {}).get("adapters") if isinstance(raw.get("data"), dict) else None
    if isinstance(adapters, dict):
        for name, value in adapters.items():
            if isinstance(value, str) and value and not os.path.isabs(value):
                adapters[name] = str((base / value).resolve())
    for sec, key in _YAML_RELATIVE_PATHS:
        section = raw.get(sec)
        if not isinstance(section, dict):
            continue
        value = section.get(key)
        if not isinstance(value, str) or not value or value == "byte" or os.path.isabs(value):
            continue
        candidate = (base / value).resolve()
        # Data files always; a model/tokenizer only if it exists there (else it may be a hub id).
        if sec == "data" and key != "tokenizer" or candidate.exists():
            section[key] = str(candidate)


def _read_recipe_file(path: str | os.PathLike) -> dict:
    """The mapping in a recipe YAML, its relative paths resolved against its directory."""
    p = Path(path)
    text = read_utf8_file(p, f"recipe file not found: {path}", f"{path}: can't read the recipe")
    raw = _read_yaml(text, f"{path}: not valid YAML") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    _resolve_yaml_paths(raw, p.resolve().parent)
    return raw


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML, apply dotted overrides, and validate every section.

    Args:
        path: The YAML file (None: start from an empty recipe, everything from overrides).
        overrides: ``section.key=value`` strings; values are parsed as YAML.

    Returns:
        The validated RecipeConfig.

    Raises:
        ConfigError: a missing or unreadable file, text that is not UTF-8 (naming the line), bad
            YAML, an unknown section/key or an invalid value.
    """
    raw = _read_recipe_file(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return RecipeConfig.from_dict(raw, source=str(path) if path else None)
