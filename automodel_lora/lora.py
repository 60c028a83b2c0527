"""The LoRA layer: linear modules keep their identity, their FQNs and their parameters.

`patch_linear_module` reassigns a linear module's `__class__` to a subclass of
(`FusedLinearLoRA` or `LinearLoRA`, the module's own class), built once per
pair, and hangs two small linears beside the frozen base:

    lora_A: (dim, in_features)     lora_B: (out_features, dim), zero at init
    y = base(x) + s * B(A(drop(x)))          dropout_position="pre"
    y = base(x) + drop(s * B(A(x)))          dropout_position="post"
    s = alpha / dim   (alpha / sqrt(dim) with rsLoRA)
    with `lora_bias` (PEFT's), lora_B has a bias b_B (out_features,), zero at init: B(h) = h B^T + b_B
    with `use_dora` (PEFT's DoRA), a trained magnitude m (out_features,) `lora_magnitude_vector` rescales rows:
    y = m / ||W + s B A||_row * (x W^T + s B(A(x))) + b      (see `automodel_lora.dora`)

A transformers `Conv1D` (GPT-2; weight stored `(in, out)`, PEFT's `fan_in_fan_out`) is patched the
same way, with the same `lora_A` / `lora_B` shapes (`Conv1DLoRA`, `FusedConv1DLoRA`).

`base(x)` is the module's own class's forward, so a bitsandbytes `Linear4bit`
keeps computing from its packed 4-bit weight. Nothing is renamed: the state
dict keeps `q_proj.weight` (and bitsandbytes' quant-state keys) and only gains
`q_proj.lora_A.weight` and `q_proj.lora_B.weight`, which is why checkpoints,
FSDP2, optimizers and `torch.compile` see an ordinary model.

The adapter's settings live in one frozen `LoraSettings` per module
(`module.lora_settings`); whole-model operations (apply, merge, remove) are in
`automodel_lora.injection`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoraSettings
from .deprecated import LEGACY_ATTRIBUTES as _LEGACY_ATTRIBUTES
from .deprecated import DeprecatedAlias as _DeprecatedAlias
from .dora import MAGNITUDE, dense_weight, dora_forward, new_magnitude, reset_magnitude_, row_norms
from .embedding_lora import EmbeddingLoRA
from .kernels import lora_add, lora_linear, lora_linear_dequant
from .matcher import conv1d_class, is_conv1d
from .patching import is_swapped_class, swapped_class, swapped_reduce
from .quant import dequantizer_4bit, is_quantized_linear, quantized_compute_dtype


class LinearLoRA(nn.Linear):
    """An `nn.Linear` (or subclass) with a LoRA adapter, computed in plain PyTorch.

    This is the reference path: every kernel is checked against it. Modules get
    this class through `patch_linear_module`; `LinearLoRA(in, out, ...)` builds a
    fresh adapted linear directly.

    Args:
        in_features, out_features, bias, device, dtype: as `nn.Linear`.
        settings: the adapter's `LoraSettings` (default: `LoraSettings()`).
        **overrides: `LoraSettings` fields applied over `settings` (`dim=16, alpha=32, ...`).

    Attributes set by the patch:
        lora_A (nn.Linear): `(dim, in_features)` down-projection.
        lora_B (nn.Linear): `(out_features, dim)` up-projection, zero at init; with a zero `(out_features,)`
            bias when `lora_settings.lora_bias`.
        lora_dropout (nn.Dropout): dropout on the adapter path, `p = lora_settings.dropout`.
        lora_magnitude_vector (nn.Parameter): with `lora_settings.use_dora`, DoRA's magnitude `(out_features,)`
            (absent otherwise; `automodel_lora.dora`).
        lora_settings (LoraSettings): the adapter's settings (its `kernels` can be changed with
            `set_kernel_options`; the rest is fixed once the adapter exists).
        lora_merged (bool): whether the adapter is folded into the base weight (`merge_lora`).

    The attributes `lora_dim`, `lora_alpha`, `lora_scale`, `lora_use_rslora`,
    `lora_dropout_position` and `lora_A_init_method` are deprecated read-only aliases of
    `lora_settings` fields (`dim`, `alpha`, `scale`, `use_rslora`, `dropout_position`,
    `lora_A_init`), kept for old code: the first read of each in a process warns
    `DeprecationWarning`.

    Raises:
        TypeError: an override that is not a `LoraSettings` field.
        ValueError: a setting outside its allowed values.
    """

    # The class whose forward computes the frozen base product; the patched
    # subclasses built by `_lora_class_for` override it with the original class.
    _lora_base_cls: type[nn.Linear] = nn.Linear
    # Whether the base weight is stored `(in, out)` (transformers `Conv1D`, PEFT's `fan_in_fan_out`).
    fan_in_fan_out: bool = False
    # Whether the base class's forward is the plain dense product of `weight` / `bias` (`nn.Linear`'s, or
    # `Conv1D`'s for the Conv1D classes), which the fused path may compute itself; set per patched class.
    _lora_dense_base: bool = True
    # The name of the adapter in `lora_A` / `lora_B` (others of the module live in `lora_inactive`, see
    # `automodel_lora.adapter_slots`), and whether it takes part in forward: False while the model's active
    # adapter is one this module does not have, or inside `disable_adapter`. Class defaults, so a module
    # with one adapter (and every module pickled before named adapters) carries no instance attribute.
    lora_adapter_name: str = "default"
    lora_enabled: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = cls.__dict__.get("_lora_base_cls")
        if base is not None:  # a patched (adapter, original) class: is the original's product the plain one?
            cls._lora_dense_base = base.forward is _dense_forward(cls.fan_in_fan_out)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        settings: LoraSettings | None = None,
        **overrides: Any,
    ):
        settings = LoraSettings.resolve(settings, overrides, "LinearLoRA")
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        _add_adapter(self, settings)

    def __reduce_ex__(self, protocol):
        """Pickle a patched module by its (adapter class, original class) pair, not by the generated class's
        name, so a fresh process (``torch.load`` of a whole model) builds the class again."""
        if not is_swapped_class(type(self)):  # LinearLoRA(...) built directly: importable
            return super().__reduce_ex__(protocol)
        return swapped_reduce(self, "_lora_base_cls")

    def __setstate__(self, state):
        """Unpickle; a module pickled before `lora_settings` existed (separate `lora_dim`, `lora_alpha`, ...
        attributes) gets its settings rebuilt from them."""
        super().__setstate__(state)
        if "lora_settings" not in self.__dict__ and "lora_dim" in self.__dict__:
            old = {field: self.__dict__.pop(attr, None) for attr, field in _LEGACY_ATTRIBUTES.items()}
            self.lora_settings = LoraSettings(
                dim=old["dim"],
                alpha=old["alpha"],
                dropout=self.lora_dropout.p,
                dropout_position=old["dropout_position"],
                lora_A_init=old["lora_A_init"],
                lora_dtype=self.lora_A.weight.dtype,
                use_rslora=bool(old["use_rslora"]),
            )

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: `x W^T + b`, through the original class's forward."""
        return self._lora_base_cls.forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., in_features) -> (..., out_features)`: base output plus the scaled adapter."""
        if self.lora_merged or not self.lora_enabled:
            return self.base_forward(x)
        if self._parameters.get(MAGNITUDE) is not None:
            return dora_forward(self, x)
        return self.base_forward(x) + self.lora_delta(x)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter term alone, in `x.dtype` (fp32 master weights are cast, never the activations)."""
        settings = self.lora_settings
        lora_A = self.lora_A.weight.to(x.dtype)  # (r, K)
        lora_B = self.lora_B.weight.to(x.dtype)  # (N, r)
        b_B = self.lora_B.bias  # (N,) with lora_bias, else None
        if settings.dropout_position == "pre":
            x = self.lora_dropout(x)
        xa = F.linear(x, lora_A) * settings.scale  # (..., r): scaling here is r/N of the work
        # PEFT's `lora_B(h) * s`: the bias is scaled too, and with "post" dropped with the rest of the delta
        delta = F.linear(xa, lora_B, None if b_B is None else b_B.to(x.dtype) * settings.scale)  # (..., N)
        if settings.dropout_position == "post":
            delta = self.lora_dropout(delta)
        return delta

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """(Re-)initialise the adapter: `lora_A` by `lora_settings.lora_A_init`, `lora_B` (and its bias) to zero."""
        settings = self.lora_settings
        weight = self.lora_A.weight
        if settings.lora_A_init == "xavier":
            nn.init.xavier_uniform_(weight)
        elif settings.lora_A_init == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(weight, std=1.0 / settings.dim)
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)
        if isinstance(self, LinearLoRA):  # an adapter holder without the base weight is done by its caller
            reset_magnitude_(self, self)

    def extra_repr(self) -> str:
        s = self.lora_settings
        return (
            f"{super().extra_repr()}, dim={s.dim}, alpha={s.alpha}, dropout={s.dropout}, "
            f"dropout_position={s.dropout_position!r}, use_rslora={s.use_rslora}, merged={self.lora_merged}"
            + (", use_dora=True" if s.use_dora else "")
        )

    # Deprecated read-only aliases of `lora_settings` fields (the names before the settings object).
    lora_dim = _DeprecatedAlias("dim")
    lora_alpha = _DeprecatedAlias("alpha")
    lora_scale = _DeprecatedAlias("scale")
    lora_use_rslora = _DeprecatedAlias("use_rslora")
    lora_dropout_position = _DeprecatedAlias("dropout_position")
    lora_A_init_method = _DeprecatedAlias("lora_A_init")


_NO_DORA: dict = {}  # the keyword arguments a plain LoRA call adds (none; never written)


class FusedLinearLoRA(LinearLoRA):
    """`LinearLoRA` whose base product and adapter run as one autograd node.

    A dense frozen base goes through `lora_linear` (base GEMM and adapter in one
    autograd node), and so does a bitsandbytes 4-bit base whose weight bitsandbytes
    would dequantize anyway (`lora_linear_dequant`: dequantized in forward and again in backward, never saved); any
    other base (a trainable weight, a subclass with its own forward, 4-bit under torch.compile) computes its own
    product and the adapter is added by `lora_add`. Those functions run Triton kernels on CUDA (with
    `lora_settings.kernels` as their `KernelOptions`) and the PyTorch reference math elsewhere, inside the same
    autograd function. (Formerly `TritonLinearLoRA`.)

    DoRA (`use_dora`): the same functions take the magnitude and the detached `||W + s B A||_row`: the pass that
    writes y scales its rows and adds the bias, the backward scales dy and recovers `dm` from y
    (`benchmarks/DESIGN.md` section 10). Active "pre" dropout takes the reference `dora_forward` (PEFT's rule needs
    a second base product on the dropped input), and so does a quantized base the 4-bit path does not take.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_merged or not self.lora_enabled:
            return self.base_forward(x)
        # Host time matters here (the kernels are short): one read of the settings object per call, and
        # parameters read from `_parameters` directly (see `_param`).
        settings = self.lora_settings
        options = settings.kernels
        dora = self._parameters.get(MAGNITUDE)
        if dora is not None and settings.dropout_position == "pre" and self.training and self.lora_dropout.p > 0:
            return dora_forward(self, x)
        modules = self._modules
        lora_B = modules["lora_B"]
        lora_bias = _param(lora_B, "bias")  # None unless lora_bias: then the kernels fold it into their bias
        adapter = (_param(modules["lora_A"], "weight"), _param(lora_B, "weight"), settings.scale,
                   modules["lora_dropout"].p if self.training else 0.0, settings.dropout_position)
        # Under autocast the kernels see what F.linear would: activations in the autocast dtype. The
        # base gets the same cast tensor, so x is cast once (autocast leaves an already-cast input alone).
        compute_x = x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x
        dtype = compute_x.dtype
        if dora is not None:  # DoRA: magnitude and detached norm (N,), the same for every route below
            dora = {"magnitude": dora, "weight_norm": row_norms(self, adapter[0], adapter[1], settings.scale)}
        else:
            dora = _NO_DORA
        if self._lora_dense_base:
            weight, bias = _param(self, "weight"), _param(self, "bias")
            if self.fan_in_fan_out:  # Conv1D's (in, out) weight: the kernels take the (out, in) view, no copy
                weight = weight.t()
            if (  # plain F.linear semantics on a frozen dense weight (and bias) of the compute dtype
                not weight.requires_grad
                and weight.dtype == dtype
                and (bias is None or (not bias.requires_grad and bias.dtype == dtype))
            ):
                return lora_linear(compute_x, weight, bias, *adapter, options=options, lora_bias=lora_bias, **dora)
        # A 4-bit base in eager mode: its weight is dequantized (as bitsandbytes would) straight into the
        # fused GEMM. Skipped when autocast cast x (bitsandbytes returns x's own dtype) and under
        # torch.compile (the dequantize closure is not a graph input).
        elif compute_x is x and not torch.compiler.is_compiling():
            dequantize = dequantizer_4bit(self, self._lora_base_cls, x)
            if dequantize is not None:
                bias = None if self.bias is None else self.bias.to(dtype)
                return lora_linear_dequant(x, dequantize, bias, *adapter, options=options, lora_bias=lora_bias,
                                           **dora)
        if dora:
            if is_quantized_linear(self):  # its dense weight would be dequantized for every call: the reference
                return dora_forward(self, x)
            dora.update(base_bias=self.bias, base_weight=dense_weight(self).detach())  # the base's own forward adds b
        return lora_add(self.base_forward(compute_x), compute_x, *adapter, options=options, lora_bias=lora_bias, **dora)


class Conv1DLoRA(LinearLoRA):
    """`LinearLoRA` for a transformers `Conv1D` (GPT-2's `c_attn`, `c_proj`, `c_fc`): weight stored `(in, out)`,
    base `x @ W + b` (PEFT's `fan_in_fan_out`). The adapter is the same `lora_A` `(r, in)` / `lora_B` `(out, r)`
    as for linears (PEFT stores the same shapes); `in_features` / `out_features` are read from the weight."""

    fan_in_fan_out = True

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def __repr__(self) -> str:  # Conv1D's own __repr__ would hide the adapter
        return nn.Module.__repr__(self)


class FusedConv1DLoRA(FusedLinearLoRA, Conv1DLoRA):
    """`FusedLinearLoRA` for a transformers `Conv1D`: the kernels get the weight's transposed `(out, in)` view."""


def _dense_forward(fan_in_fan_out: bool):
    """The forward whose product the fused path computes itself: `nn.Linear`'s, or `Conv1D`'s."""
    if not fan_in_fan_out:
        return nn.Linear.forward
    cls = conv1d_class()
    return None if cls is None else cls.forward


def __getattr__(name: str):
    if name == "TritonLinearLoRA":  # old pickles name the class so: they still load
        warnings.warn("TritonLinearLoRA is deprecated; it is FusedLinearLoRA", DeprecationWarning, stacklevel=2)
        return FusedLinearLoRA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _param(module: nn.Module, name: str):
    """``getattr(module, name)``, read from ``module._parameters`` when it is there: ``nn.Module.__getattr__``
    runs Python per lookup, and the layer's forward makes several per step (host time per call is a
    measurable share of a small layer's step). Parametrized or plain-attribute weights are not in
    ``_parameters`` and take ``getattr``."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _lora_class_for(lora_cls: type[LinearLoRA], base_cls: type[nn.Linear]) -> type:
    """The class a `base_cls` module is switched to: a subclass of (`lora_cls`, `base_cls`), built once."""
    return swapped_class(lora_cls, base_cls, "_lora_base_cls")


def is_lora_module(module: nn.Module) -> bool:
    """True for a module that carries a LoRA adapter of this library (a linear or an `EmbeddingLoRA`)."""
    return isinstance(module, (LinearLoRA, EmbeddingLoRA))


def lora_modules(model: nn.Module) -> list[tuple[str, LinearLoRA]]:
    """`(fqn, module)` for every adapted module of `model` (itself included)."""
    return [(name, m) for name, m in model.named_modules() if is_lora_module(m)]


def patch_linear_module(
    linear: nn.Linear,
    settings: LoraSettings | None = None,
    *,
    use_triton: bool = True,
    **overrides: Any,
) -> nn.Linear:
    """Give `linear` a LoRA adapter in place and return the same object.

    Its class becomes a cached subclass of (`FusedLinearLoRA` if `use_triton`
    else `LinearLoRA`, its own class), so `isinstance(m, nn.Linear)` and
    `isinstance(m, LinearLoRA)` both hold; `weight`/`bias` (and quant state)
    stay the same objects; `lora_A`/`lora_B` are added on the weight's device
    (the meta device too: call `init_lora_weights` after `to_empty`).

    Example: ``patch_linear_module(layer, dim=16, alpha=32)``, or
    ``patch_linear_module(layer, cfg.lora_settings(), kernels=KernelOptions(base_gemm="cublas"))``.

    Args:
        linear: an `nn.Linear` or subclass (bitsandbytes `Linear4bit` included), or a transformers `Conv1D`
            (weight `(in, out)`, switched to `Conv1DLoRA` / `FusedConv1DLoRA`; weight and bias stay as stored).
        settings: the adapter's `LoraSettings` (default: `LoraSettings()`: dim 8, alpha 32, ...).
        use_triton: the fused path (`FusedLinearLoRA`: Triton kernels on CUDA, the same autograd
            function with PyTorch math elsewhere); False for the plain `LinearLoRA` reference.
        **overrides: `LoraSettings` fields applied over `settings`: `dim`, `alpha`, `dropout`,
            `dropout_position`, `lora_A_init`, `lora_dtype`, `use_rslora`, `kernels`, `lora_bias`, `use_dora`.
            `lora_A_init_method=` is the deprecated name of `lora_A_init=` (a `DeprecationWarning`).

    Raises:
        TypeError: `linear` is not an `nn.Linear`, `settings` is not a `LoraSettings`, or an override
            is not a field.
        ValueError: it already has an adapter, or a setting is invalid.
    """
    conv1d = is_conv1d(linear)
    if not (conv1d or isinstance(linear, nn.Linear)):
        raise TypeError(
            f"patch_linear_module needs an nn.Linear (or subclass) or a transformers Conv1D, got {type(linear).__name__}"
        )
    if is_lora_module(linear):
        raise ValueError(
            f"this {linear._lora_base_cls.__name__} already has a LoRA adapter (rank {linear.lora_settings.dim}); "
            "call remove_lora(model) first to replace it"
        )
    settings = LoraSettings.resolve(settings, overrides, "patch_linear_module")
    base_cls = type(linear)
    _add_adapter(linear, settings)
    if conv1d:
        adapter_cls = FusedConv1DLoRA if use_triton else Conv1DLoRA
    else:
        adapter_cls = FusedLinearLoRA if use_triton else LinearLoRA
    linear.__class__ = _lora_class_for(adapter_cls, base_cls)
    return linear


def _add_adapter(linear: nn.Linear, settings: LoraSettings) -> None:
    """Freeze the base and attach `lora_A`, `lora_B`, `lora_dropout`, `lora_settings` and `lora_merged`."""
    for param in linear.parameters(recurse=False):
        param.requires_grad_(False)
    for attr, value in new_adapter_parts(linear, settings).items():
        if attr == MAGNITUDE:  # a parameter, registered only for DoRA (plain LoRA modules have no such entry)
            if value is not None:
                linear.register_parameter(MAGNITUDE, value)
        else:
            setattr(linear, attr, value)
    linear.lora_merged = False


def new_adapter_parts(linear: nn.Module, settings: LoraSettings) -> dict[str, Any]:
    """A freshly initialised adapter for `linear`'s shapes, on its weight's device: `lora_A` `(dim, in)`,
    `lora_B` `(out, dim)` (zero), `lora_dropout`, `lora_settings` (`lora_dtype` resolved) and
    `lora_magnitude_vector` (`||W||_row` with `use_dora`, else None), by name."""
    if settings.lora_dtype is None:
        lora_dtype = quantized_compute_dtype(linear) if is_quantized_linear(linear) else linear.weight.dtype
        settings = settings.replace(lora_dtype=lora_dtype)
    device, dtype, dim = linear.weight.device, settings.lora_dtype, settings.dim
    in_features, out_features = linear.weight.shape if is_conv1d(linear) else (linear.in_features, linear.out_features)
    parts = nn.Module()  # a holder with the attribute names reset_lora_parameters reads
    parts.lora_A = nn.Linear(in_features, dim, bias=False, device=device, dtype=dtype)
    parts.lora_B = nn.Linear(dim, out_features, bias=settings.lora_bias, device=device, dtype=dtype)
    parts.lora_dropout = nn.Dropout(p=settings.dropout)
    parts.lora_settings = settings
    LinearLoRA.reset_lora_parameters(parts)
    magnitude = new_magnitude(linear, dtype) if settings.use_dora else None
    return {"lora_A": parts.lora_A, "lora_B": parts.lora_B, "lora_dropout": parts.lora_dropout,
            "lora_settings": settings, MAGNITUDE: magnitude}


# What `_add_adapter` attaches beyond the submodules; `remove_lora` takes these off again.
LORA_ATTRIBUTES = ("lora_settings", "lora_merged")

