"""`PeftConfig`: what to adapt and how, as a validated dataclass.

The same object comes from three places: Python (`PeftConfig(dim=16, ...)`),
the `peft:` section of a YAML recipe (`PeftConfig.from_dict`), or a YAML file
of its own (`PeftConfig.from_yaml`). Every check lives in `__post_init__`, so
a bad value fails where it is written, with the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .matcher import validate_pattern

DROPOUT_POSITIONS = ("pre", "post")
LORA_A_INITS = ("xavier", "kaiming", "gaussian")

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


@dataclass
class PeftConfig:
    """Which linear modules get a LoRA adapter, and the adapter's hyper-parameters.

    Args:
        target_modules: module names or patterns to adapt. A plain name matches
            the full FQN or any dotted suffix (`"q_proj"`, `"self_attn.q_proj"`);
            a pattern with `*`, `?` or `[...]` matches the whole FQN
            (`"*.layers.[0-3].*"`). See `ModuleMatcher`.
        exclude_modules: names or patterns never adapted; they win over targets.
        match_all_linear: adapt every linear layer except the output head.
            Mutually exclusive with `target_modules`.
        dim: LoRA rank `r` (> 0).
        alpha: LoRA alpha; the adapter output is scaled by `alpha / dim`
            (or `alpha / sqrt(dim)` with `use_rslora`).
        dropout: dropout probability in `[0, 1)` on the adapter path.
        dropout_position: `"pre"` drops the adapter's input (as HF PEFT does),
            `"post"` drops the adapter's output.
        lora_A_init: `"xavier"` (uniform), `"kaiming"` (uniform, as PEFT) or
            `"gaussian"` (normal with std 1/dim); `lora_B` always starts at zero.
        lora_dtype: dtype of the adapter weights; None means the base layer's
            dtype (bf16 for a 4-bit base). With `float32` the adapters are fp32
            master weights but compute still runs in the activation dtype.
        use_triton: run the adapter math in Triton kernels on CUDA (the PyTorch
            path is used on the CPU either way).
        use_rslora: rank-stabilised scale `alpha / sqrt(dim)`.
        recompute_mlp_input: in gated MLPs (Llama, Mistral, Qwen2/3, Gemma, ...; see
            `automodel_lora.recompute.is_gated_mlp`) whose
            `down_proj` is adapted, make `down_proj`'s input `act(gate) * up` again in
            backward instead of keeping it from forward (bit-identical results; saves
            `tokens x intermediate` activations per layer for one elementwise pass; see
            `automodel_lora.recompute`).

    Raises:
        ValueError: a field holds a value outside what is listed above.
    """

    target_modules: list = field(default_factory=list)
    exclude_modules: list = field(default_factory=list)
    match_all_linear: bool = False
    dim: int = 8
    alpha: int = 32
    dropout: float = 0.0
    dropout_position: str = "post"
    lora_A_init: str = "xavier"
    lora_dtype: torch.dtype | str | None = None
    use_triton: bool = True
    use_rslora: bool = False
    recompute_mlp_input: bool = True

    def __post_init__(self):
        self.target_modules = _as_name_list(self.target_modules, "target_modules")
        self.exclude_modules = _as_name_list(self.exclude_modules, "exclude_modules")
        validate_adapter_hparams(self.dim, self.alpha, self.dropout, self.dropout_position, self.lora_A_init)
        self.lora_dtype = dtype_from_str(self.lora_dtype, "PeftConfig.lora_dtype")
        for flag in ("match_all_linear", "use_triton", "use_rslora", "recompute_mlp_input"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"PeftConfig.{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.match_all_linear and self.target_modules:
            raise ValueError(
                f"PeftConfig.match_all_linear=True together with target_modules={self.target_modules!r}: "
                "choose one (drop target_modules to adapt every linear, or set match_all_linear=False)"
            )

    @property
    def scale(self) -> float:
        """The factor applied to the adapter output: `alpha / dim`, or `alpha / sqrt(dim)` with rsLoRA."""
        return lora_scale(self.alpha, self.dim, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (dtype as a string) that `from_dict` turns back into an equal config."""
        d = dataclasses.asdict(self)
        d["lora_dtype"] = dtype_to_str(self.lora_dtype)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PeftConfig:
        """Build from a dict (a YAML `peft:` section); missing keys take their defaults.

        Raises:
            ValueError: a key is not a field (the message lists the valid keys), or a value is invalid.
        """
        if not isinstance(d, dict):
            raise ValueError(f"PeftConfig.from_dict expects a mapping, got {type(d).__name__}: {d!r}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown PeftConfig key(s) {unknown}; valid keys are {valid}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str) -> PeftConfig:
        """Read a YAML file holding the config's keys (or a recipe with a `peft:` section)."""
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if isinstance(d, dict) and isinstance(d.get("peft"), dict):
            d = d["peft"]
        return cls.from_dict(d)


def validate_adapter_hparams(dim, alpha, dropout, dropout_position, lora_A_init, owner: str = "PeftConfig") -> None:
    """Check one adapter's hyper-parameters; shared by `PeftConfig` and `patch_linear_module`.

    Raises:
        ValueError: naming the field, the bad value and what is allowed.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"{owner}.dim must be a positive integer (the LoRA rank), got {dim!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{owner}.alpha must be a finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}.dropout must be a probability in [0, 1), got {dropout!r}")
    if dropout_position not in DROPOUT_POSITIONS:
        raise ValueError(f"{owner}.dropout_position={dropout_position!r} is not allowed; use one of {DROPOUT_POSITIONS}")
    if lora_A_init not in LORA_A_INITS:
        raise ValueError(f"{owner}.lora_A_init={lora_A_init!r} is not allowed; use one of {LORA_A_INITS}")


def lora_scale(alpha: float, dim: int, use_rslora: bool = False) -> float:
    """`alpha / dim`, or `alpha / sqrt(dim)` for rank-stabilised LoRA."""
    return alpha / math.sqrt(dim) if use_rslora else alpha / dim


def _as_name_list(value, field_name: str) -> list[str]:
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
