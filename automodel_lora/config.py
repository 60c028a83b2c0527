"""`PeftConfig` (what to adapt and how) and `LoraSettings` (one adapter's settings), validated dataclasses.

`PeftConfig` comes from three places: Python (`PeftConfig(dim=16, ...)`), the
`peft:` section of a YAML recipe (`PeftConfig.from_dict`), or a YAML file of its
own (`PeftConfig.from_yaml`). It holds which modules to adapt plus the adapter
settings as flat fields; `PeftConfig.lora_settings()` gives those settings as the
frozen `LoraSettings` that `patch_linear_module` takes and every adapted module
keeps (`module.lora_settings`). The names are the same everywhere: `dim`,
`alpha`, `dropout`, `dropout_position`, `lora_A_init`, `lora_dtype`,
`use_rslora`, `kernels`, `lora_bias`, `use_dora` (HF PEFT's file format calls `dim` `r` and `alpha`
`lora_alpha`; only `adapter_io` translates). `PeftConfig` also takes PEFT's
names `r`, `lora_alpha` and `lora_dropout` as aliases of `dim`, `alpha` and
`dropout` (keyword or `from_dict` key; both spellings of one field at once is an
error; `to_dict` writes this library's names). Every check lives in a
`__post_init__`, so a bad value fails where it is written, with the field, the
value and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .config_fields import as_name_list as _as_name_list
from .config_fields import check_layer_selection, check_modules_to_save, did_you_mean, dtype_from_str, dtype_to_str  # noqa: F401 (re-exported)
from .kernels.options import KernelOptions
from .matcher import pattern_key, pattern_key_regex

DROPOUT_POSITIONS = ("pre", "post")
# HF PEFT's `LoraConfig` names that `PeftConfig` accepts for its own fields.
PEFT_ALIASES = {"r": "dim", "lora_alpha": "alpha", "lora_dropout": "dropout"}
LORA_A_INITS = ("xavier", "kaiming", "gaussian")

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
        kernels: how the Triton kernel path runs (`KernelOptions`: `base_gemm`,
            `fuse_proj`, `fast_launch`); a mapping in YAML (`kernels: {base_gemm: cublas}`).
            Missing keys take their environment defaults. Change it on a patched
            model with `set_kernel_options`.
        layers_to_transform: HF PEFT's layer selection: only modules in these layers (an index or a
            list of indices) are adapted; None (or `[]`): every layer. The index is the number after
            `layers_pattern` in the FQN (`model.layers.3.mlp.up_proj` -> 3), see `ModuleMatcher`.
        layers_pattern: the name (or names) of the module list holding the layers (`"layers"` for
            Llama, `"h"` for GPT-2); None: the first number after any inner component of the FQN.
            Needs `layers_to_transform`.
        rank_pattern: `{regex: rank}` for modules whose rank differs from `dim`; a key matches a
            module whose FQN or a dotted suffix of it the regex matches to the end (HF PEFT's
            `get_pattern_key`: `re.match(rf"(.*\\.)?({key})$", fqn)`); the first matching key wins.
        alpha_pattern: `{regex: alpha}`, the same for `alpha`.
        modules_to_save: names of whole modules trained fully beside the adapters (HF PEFT's
            `modules_to_save`, e.g. `["score"]` for a classification head, `["embed_tokens", "lm_head"]`); an
            entry selects a module whose FQN equals it or ends with `"." + entry`. The modules stay in place
            (no wrapper), their parameters are made trainable, and `save_adapter` writes their full tensors
            under PEFT's keys (`base_model.model.<fqn>.weight`). An entry matching nothing is an error (unless
            `allow_unmatched_targets`), as is a module both adapted and listed here, or one whose weight is
            tied to a module not listed. See `automodel_lora.modules_to_save`.
        allow_unmatched_targets: by default every `target_modules` entry must select at least one
            linear module of the model, else applying fails naming the entry and the closest real
            names (a typo such as `"q_prj"`); True lets entries match nothing (a config shared
            across architectures), as long as something is selected.
        lora_bias: give `lora_B` a bias `b_B` (`(out_features,)`, zero at init, trained), HF PEFT's
            `lora_bias`: the adapter term becomes `s * (B A drop(x) + b_B)`. Merging folds `s * b_B` into the
            base bias, so it is refused for a base without one (as PEFT refuses it).
        use_dora: DoRA (HF PEFT's `use_dora`): each adapted module also trains a magnitude
            `lora_magnitude_vector` `(out_features,)` and computes `m / ||W + s B A||_row * (x W^T + s B A x) + b`
            (see `automodel_lora.dora`). Not with `lora_bias` (PEFT refuses the pair too).
        target_parameters: expert weights to adapt, HF PEFT's `target_parameters`: an entry selects the
            3-D parameter whose `<module fqn>.<name>` equals it or ends with `"." + entry`
            (`["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`). Only the fused expert weights of
            transformers' MoE experts modules (see `automodel_lora.experts_lora`); each entry must select one,
            else applying fails naming it. Beside `target_modules` / `match_all_linear` or alone.
        match_all_experts: adapt every expert weight (`gate_up_proj` / `up_proj`, `down_proj`) of every
            experts module, as `target_parameters` naming them all would (`match_all_linear` leaves the
            experts out).
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
    kernels: KernelOptions = field(default_factory=KernelOptions)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    allow_unmatched_targets: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    lora_bias: bool = False
    use_dora: bool = False
    target_parameters: list = field(default_factory=list)
    match_all_experts: bool = False

    def __post_init__(self):
        self.target_modules = _as_name_list(self.target_modules, "target_modules")
        self.exclude_modules = _as_name_list(self.exclude_modules, "exclude_modules")
        self.target_parameters = _as_name_list(self.target_parameters, "target_parameters")
        self.modules_to_save = check_modules_to_save(self.modules_to_save, self.target_modules)
        self.layers_to_transform, self.layers_pattern = check_layer_selection(self.layers_to_transform,
                                                                              self.layers_pattern)
        self.rank_pattern = _pattern_dict(self.rank_pattern, "rank_pattern", "dim")
        self.alpha_pattern = _pattern_dict(self.alpha_pattern, "alpha_pattern", "alpha")
        self.lora_dtype = dtype_from_str(self.lora_dtype, "PeftConfig.lora_dtype")
        try:
            self.kernels = KernelOptions.from_dict(self.kernels)
            self.lora_settings()  # validates the adapter fields
        except ValueError as e:  # name the class the user wrote
            msg = str(e).replace("LoraSettings.", "PeftConfig.").replace("KernelOptions", "PeftConfig.kernels")
            raise ValueError(msg) from None
        for flag in ("match_all_linear", "use_triton", "use_rslora", "recompute_mlp_input", "allow_unmatched_targets",
                     "match_all_experts"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"PeftConfig.{flag} must be true or false, got {getattr(self, flag)!r}")
        if self.match_all_linear and self.target_modules:
            raise ValueError(
                f"PeftConfig.match_all_linear=True together with target_modules={self.target_modules!r}: "
                "choose one (drop target_modules to adapt every linear, or set match_all_linear=False)"
            )

        if self.adapts_experts and (self.dropout or self.use_dora or self.lora_bias):
            what = "dropout" if self.dropout else "use_dora" if self.use_dora else "lora_bias"
            raise ValueError(
                f"PeftConfig: {what} with LoRA on expert weights (target_parameters / match_all_experts): HF PEFT's "
                f"target_parameters adapters have no {what}, and its loader refuses such a file; set {what} off, "
                "or adapt the experts in a separate adapter"
            )

    @property
    def adapts_experts(self) -> bool:
        """Whether the config adapts expert weights (`target_parameters` or `match_all_experts`)."""
        return bool(self.target_parameters) or self.match_all_experts

    @property
    def scale(self) -> float:
        """The factor applied to the adapter output: `alpha / dim`, or `alpha / sqrt(dim)` with rsLoRA."""
        return lora_scale(self.alpha, self.dim, self.use_rslora)

    def settings_for(self, fqn: str, settings: LoraSettings | None = None) -> LoraSettings:
        """The settings of the module `fqn`: `lora_settings()` with `rank_pattern` / `alpha_pattern` applied."""
        settings = settings or self.lora_settings()
        changes = {}
        for patterns, name in ((self.rank_pattern, "dim"), (self.alpha_pattern, "alpha")):
            key = pattern_key(patterns, fqn)
            if key is not None:
                changes[name] = patterns[key]
        return settings.replace(**changes) if changes else settings

    def lora_settings(self) -> LoraSettings:
        """The per-adapter settings of this config, as `patch_linear_module` takes them.

        Raises:
            ValueError: an adapter field is invalid (also raised when the config is built).
        """
        return LoraSettings(
            dim=self.dim,
            alpha=self.alpha,
            dropout=self.dropout,
            dropout_position=self.dropout_position,
            lora_A_init=self.lora_A_init,
            lora_dtype=self.lora_dtype,
            use_rslora=self.use_rslora,
            kernels=self.kernels,
            lora_bias=self.lora_bias,
            use_dora=self.use_dora,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (dtype as a string, `kernels` as a mapping) that `from_dict` turns back into an equal
        config."""
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
        unknown = sorted(set(d) - set(valid) - set(PEFT_ALIASES))
        if unknown:
            hint = did_you_mean(unknown, [*valid, *PEFT_ALIASES])
            raise ValueError(f"unknown PeftConfig key(s) {unknown}; valid keys are {valid}{hint}")
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


def _with_peft_aliases(init):
    """Wrap the dataclass `__init__` so PEFT's names (`r`, `lora_alpha`, `lora_dropout`) set our fields."""
    positional = [f.name for f in dataclasses.fields(PeftConfig) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for alias, name in PEFT_ALIASES.items():
            if alias not in kwargs:
                continue
            if name in kwargs or positional.index(name) < len(args):
                raise ValueError(
                    f"PeftConfig got both {name} and {alias} (HF PEFT's name for {name}); give one, e.g. "
                    f"{name}={kwargs.get(alias)!r}"
                )
            kwargs[name] = kwargs.pop(alias)
        init(self, *args, **kwargs)

    return __init__


PeftConfig.__init__ = _with_peft_aliases(PeftConfig.__init__)


@dataclass(frozen=True)
class LoraSettings:
    """One adapter's settings: what `patch_linear_module` takes and an adapted module keeps in `lora_settings`.

    Frozen, so modules can share one value; `replace(**changes)` gives a validated copy. The field names are
    `PeftConfig`'s (`PeftConfig.lora_settings()` builds one).

    Args:
        dim: LoRA rank `r` (a positive integer).
        alpha: scale numerator (a positive finite number): the adapter output is scaled by `alpha / dim`
            (`alpha / sqrt(dim)` with `use_rslora`).
        dropout: adapter dropout probability in `[0, 1)`.
        dropout_position: `"pre"` (on the adapter's input, as HF PEFT) or `"post"` (on its output).
        lora_A_init: `"xavier"`, `"kaiming"` or `"gaussian"` (std `1 / dim`); `lora_B` starts at zero.
        lora_dtype: adapter weight dtype (a `torch.dtype` or a name such as `"bf16"`); None = the base
            weight's (the compute dtype for a 4-bit base). A patched module keeps the resolved dtype.
        use_rslora: rank-stabilised scale `alpha / sqrt(dim)`.
        kernels: `KernelOptions` for the fused kernel path (a mapping is converted); ignored by the
            PyTorch reference path.
        lora_bias: `lora_B` has a bias `b_B` (HF PEFT's `lora_bias`): the adapter term is
            `s * (B A drop(x) + b_B)` (with `"post"` dropout, `drop(s * (B A x + b_B))`).
        use_dora: DoRA (HF PEFT's `use_dora`): a trained magnitude `m` `(out_features,)` rescales each output
            row, `y = m / ||W + s B A||_row * (x W^T + s B A x) + b` (see `automodel_lora.dora`).

    Attributes:
        scale: `alpha / dim` (or `alpha / sqrt(dim)`), derived.

    Raises:
        ValueError: a field outside the values above, naming the field, the value and what is allowed.
    """

    dim: int = 8
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: str = "post"
    lora_A_init: str = "xavier"
    lora_dtype: torch.dtype | None = None
    use_rslora: bool = False
    kernels: KernelOptions = field(default_factory=KernelOptions)
    lora_bias: bool = False
    use_dora: bool = False
    scale: float = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        dim, alpha, dropout = self.dim, self.alpha, self.dropout
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"LoraSettings.dim must be a positive integer (the LoRA rank), got {dim!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(
                f"LoraSettings.alpha must be a positive finite number (the adapter is scaled by alpha / dim), got {alpha!r}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be a probability in [0, 1), got {dropout!r}")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(
                f"LoraSettings.dropout_position={self.dropout_position!r} is not allowed; use one of {DROPOUT_POSITIONS}"
            )
        if self.lora_A_init not in LORA_A_INITS:
            raise ValueError(f"LoraSettings.lora_A_init={self.lora_A_init!r} is not allowed; use one of {LORA_A_INITS}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraSettings.use_rslora must be true or false, got {self.use_rslora!r}")
        if not isinstance(self.lora_bias, bool):
            raise ValueError(f"LoraSettings.lora_bias must be true or false (a bias on lora_B), got {self.lora_bias!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraSettings.use_dora must be true or false (DoRA's magnitude), got {self.use_dora!r}")
        if self.use_dora and self.lora_bias:  # HF PEFT's LoraConfig refuses the pair as well
            raise ValueError("LoraSettings.use_dora=True with lora_bias=True: DoRA does not support a lora_B bias "
                             "(HF PEFT refuses it too); set lora_bias=False or use_dora=False")
        object.__setattr__(self, "lora_dtype", dtype_from_str(self.lora_dtype, "LoraSettings.lora_dtype"))
        object.__setattr__(self, "kernels", KernelOptions.from_dict(self.kernels))
        object.__setattr__(self, "scale", lora_scale(alpha, dim, self.use_rslora))

    def replace(self, **changes: Any) -> LoraSettings:
        """A validated copy with `changes` applied (`scale` follows).

        Raises:
            TypeError: a key that is not a field.
            ValueError: a bad value.
        """
        return dataclasses.replace(self, **changes)

    @classmethod
    def resolve(cls, settings: LoraSettings | None, overrides: dict[str, Any], owner: str) -> LoraSettings:
        """`settings` (or the defaults) with keyword `overrides` applied: what `patch_linear_module(linear,
        settings, **overrides)` and `LinearLoRA(..., **overrides)` mean. `lora_A_init_method` (the old keyword)
        is taken as `lora_A_init` with a `DeprecationWarning`.

        Raises:
            TypeError: `settings` is not a `LoraSettings`, or a key is not a field.
            ValueError: a bad value.
        """
        if settings is not None and not isinstance(settings, cls):
            raise TypeError(
                f"{owner}: settings must be a LoraSettings (or None), got {type(settings).__name__} {settings!r}; "
                "pass the adapter fields by keyword, e.g. dim=16, alpha=32"
            )
        if "lora_A_init_method" in overrides:
            warnings.warn(
                f"{owner}(lora_A_init_method=...) is deprecated; use lora_A_init=... (PeftConfig's name)",
                DeprecationWarning,
                stacklevel=3,
            )
            if "lora_A_init" in overrides:
                raise TypeError(f"{owner}: pass lora_A_init only (lora_A_init_method is its deprecated name)")
            overrides = dict(overrides)
            overrides["lora_A_init"] = overrides.pop("lora_A_init_method")
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(f"{owner} got unexpected keyword argument(s) {unknown}; the adapter settings are {valid}")
        return settings.replace(**overrides) if settings is not None else cls(**overrides)


def lora_scale(alpha: float, dim: int, use_rslora: bool = False) -> float:
    """`alpha / dim`, or `alpha / sqrt(dim)` for rank-stabilised LoRA."""
    return alpha / math.sqrt(dim) if use_rslora else alpha / dim


def _pattern_dict(value, field_name: str, target: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"PeftConfig.{field_name} must be a mapping of regex -> {target} (HF PEFT's), got {value!r}; "
            f"e.g. {field_name}={{'q_proj': 16}}"
        )
    for key, v in value.items():
        try:
            if not isinstance(key, str) or not key:
                raise re.error("not a non-empty string")
            pattern_key_regex(key)
        except re.error as e:
            raise ValueError(f"PeftConfig.{field_name} key {key!r} is not a valid regular expression ({e})") from None
        try:
            LoraSettings(**{target: v})
        except ValueError as e:
            msg = str(e).replace(f"LoraSettings.{target}", "the value")
            raise ValueError(f"PeftConfig.{field_name}[{key!r}]: {msg}") from None
    return dict(value)
