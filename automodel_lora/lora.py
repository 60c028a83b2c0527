"""In-place LoRA: linear modules keep their identity, their FQNs and their parameters.

`patch_linear_module` reassigns a linear module's `__class__` to a subclass of
(`LinearLoRA` or `TritonLinearLoRA`, the module's own class), built once per
pair, and hangs two small linears beside the frozen base:

    lora_A: (r, in_features)     lora_B: (out_features, r), zero at init
    y = base(x) + s * B(A(drop(x)))          dropout_position="pre"
    y = base(x) + drop(s * B(A(x)))          dropout_position="post"
    s = alpha / r   (alpha / sqrt(r) with rsLoRA)

`base(x)` is the module's own class's forward, so a bitsandbytes `Linear4bit`
keeps computing from its packed 4-bit weight. Nothing is renamed: the state
dict keeps `q_proj.weight` (and bitsandbytes' quant-state keys) and only gains
`q_proj.lora_A.weight` and `q_proj.lora_B.weight`, which is why checkpoints,
FSDP2, optimizers and `torch.compile` see an ordinary model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PeftConfig, dtype_from_str, lora_scale, validate_adapter_hparams
from .kernels import lora_add, lora_linear, lora_linear_dequant
from .matcher import ModuleMatcher
from .patching import is_swapped_class, swapped_class, swapped_reduce
from .quant import dequantizer_4bit, is_quantized_linear, quantized_compute_dtype
from .recompute import recompute_mlp_inputs, restore_mlp_classes


class LinearLoRA(nn.Linear):
    """An `nn.Linear` (or subclass) with a LoRA adapter, computed in plain PyTorch.

    This is the reference path: every kernel is checked against it. Modules get
    this class through `patch_linear_module`; `LinearLoRA(in, out, ...)` builds a
    fresh adapted linear directly.

    Attributes set by the patch:
        lora_A (nn.Linear): `(r, in_features)` down-projection.
        lora_B (nn.Linear): `(out_features, r)` up-projection, zero at init.
        lora_dropout (nn.Dropout): dropout on the adapter path.
        lora_dim, lora_alpha, lora_scale, lora_dropout_position, lora_use_rslora,
        lora_A_init_method, lora_merged: the adapter's settings and state.
    """

    # The class whose forward computes the frozen base product; the patched
    # subclasses built by `_lora_class_for` override it with the original class.
    _lora_base_cls: type[nn.Linear] = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        dim: int = 8,
        alpha: float = 32,
        dropout: float = 0.0,
        dropout_position: str = "post",
        lora_A_init_method: str = "xavier",
        lora_dtype: torch.dtype | str | None = None,
        use_rslora: bool = False,
    ):
        validate_adapter_hparams(dim, alpha, dropout, dropout_position, lora_A_init_method, owner="LinearLoRA")
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        _add_adapter(self, dim, alpha, dropout, dropout_position, lora_A_init_method, lora_dtype, use_rslora)

    def __reduce_ex__(self, protocol):
        """Pickle a patched module by its (adapter class, original class) pair, not by the generated class's
        name, so a fresh process (``torch.load`` of a whole model) builds the class again."""
        if not is_swapped_class(type(self)):  # LinearLoRA(...) built directly: importable
            return super().__reduce_ex__(protocol)
        return swapped_reduce(self, "_lora_base_cls")

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer alone: `x W^T + b`, through the original class's forward."""
        return self._lora_base_cls.forward(self, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(..., in_features) -> (..., out_features)`: base output plus the scaled adapter."""
        base = self.base_forward(x)
        if self.lora_merged:
            return base
        return base + self.lora_delta(x)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter term alone, in `x.dtype` (fp32 master weights are cast, never the activations)."""
        lora_A = self.lora_A.weight.to(x.dtype)  # (r, K)
        lora_B = self.lora_B.weight.to(x.dtype)  # (N, r)
        if self.lora_dropout_position == "pre":
            x = self.lora_dropout(x)
        xa = F.linear(x, lora_A) * self.lora_scale  # (..., r): scaling here is r/N of the work
        delta = F.linear(xa, lora_B)  # (..., N)
        if self.lora_dropout_position == "post":
            delta = self.lora_dropout(delta)
        return delta

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """(Re-)initialise the adapter: `lora_A` by `lora_A_init_method`, `lora_B` to zero."""
        weight = self.lora_A.weight
        if self.lora_A_init_method == "xavier":
            nn.init.xavier_uniform_(weight)
        elif self.lora_A_init_method == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(weight, std=1.0 / self.lora_dim)
        nn.init.zeros_(self.lora_B.weight)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, lora_dim={self.lora_dim}, lora_alpha={self.lora_alpha}, "
            f"lora_dropout={self.lora_dropout.p}, dropout_position={self.lora_dropout_position!r}, "
            f"merged={self.lora_merged}"
        )


class TritonLinearLoRA(LinearLoRA):
    """`LinearLoRA` whose adapter math runs in Triton kernels on CUDA.

    A dense frozen base goes through `lora_linear` (base GEMM and adapter in one
    autograd node), and so does a bitsandbytes 4-bit base whose weight bitsandbytes
    would dequantize anyway (`lora_linear_dequant`: dequantized in forward and again
    in backward, never saved); any other base (a trainable weight, a subclass with
    its own forward, 4-bit under torch.compile) computes its own product and the
    adapter is added by `lora_add`. On the CPU the same autograd functions run the PyTorch
    reference math.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_merged:
            return self.base_forward(x)
        modules = self._modules
        adapter = (_param(modules["lora_A"], "weight"), _param(modules["lora_B"], "weight"), self.lora_scale,
                   modules["lora_dropout"].p if self.training else 0.0, self.lora_dropout_position)
        # Under autocast the kernels see what F.linear would: activations in the autocast dtype. The
        # base gets the same cast tensor, so x is cast once (autocast leaves an already-cast input alone).
        compute_x = x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x
        dtype = compute_x.dtype
        if self._lora_base_cls.forward is nn.Linear.forward:
            weight, bias = _param(self, "weight"), _param(self, "bias")
            if (  # plain F.linear semantics on a frozen dense weight (and bias) of the compute dtype
                not weight.requires_grad
                and weight.dtype == dtype
                and (bias is None or (not bias.requires_grad and bias.dtype == dtype))
            ):
                return lora_linear(compute_x, weight, bias, *adapter)
        # A 4-bit base in eager mode: its weight is dequantized (as bitsandbytes would) straight into the
        # fused GEMM. Skipped when autocast cast x (bitsandbytes returns x's own dtype) and under
        # torch.compile (the dequantize closure is not a graph input).
        elif compute_x is x and not torch.compiler.is_compiling():
            dequantize = dequantizer_4bit(self, self._lora_base_cls, x)
            if dequantize is not None:
                bias = self.bias
                return lora_linear_dequant(x, dequantize, None if bias is None else bias.to(dtype), *adapter)
        return lora_add(self.base_forward(compute_x), compute_x, *adapter)


def _param(module: nn.Module, name: str):
    """``getattr(module, name)``, read from ``module._parameters`` when it is there: ``nn.Module.__getattr__``
    runs Python per lookup, and the layer's forward makes several per step (host time, benchmarks/NOTES.md).
    Parametrized or plain-attribute weights are not in ``_parameters`` and take ``getattr``."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _lora_class_for(lora_cls: type[LinearLoRA], base_cls: type[nn.Linear]) -> type:
    """The class a `base_cls` module is switched to: a subclass of (`lora_cls`, `base_cls`), built once."""
    return swapped_class(lora_cls, base_cls, "_lora_base_cls")


def is_lora_module(module: nn.Module) -> bool:
    """True for a module that carries a LoRA adapter of this library."""
    return isinstance(module, LinearLoRA)


def lora_modules(model: nn.Module) -> list[tuple[str, LinearLoRA]]:
    """`(fqn, module)` for every adapted module of `model` (itself included)."""
    return [(name, m) for name, m in model.named_modules() if is_lora_module(m)]


def patch_linear_module(
    linear: nn.Linear,
    dim: int = 8,
    alpha: float = 32,
    dropout: float = 0.0,
    dropout_position: str = "post",
    lora_A_init_method: str = "xavier",
    lora_dtype: torch.dtype | str | None = None,
    use_triton: bool = True,
    use_rslora: bool = False,
) -> nn.Linear:
    """Give `linear` a LoRA adapter in place and return the same object.

    Its class becomes a cached subclass of (`TritonLinearLoRA` if `use_triton`
    else `LinearLoRA`, its own class), so `isinstance(m, nn.Linear)` and
    `isinstance(m, LinearLoRA)` both hold; `weight`/`bias` (and quant state)
    stay the same objects; `lora_A`/`lora_B` are added on the weight's device
    (the meta device too: call `init_lora_weights` after `to_empty`).

    Args:
        linear: an `nn.Linear` or subclass (bitsandbytes `Linear4bit` included).
        dim: rank `r`.
        alpha: scale numerator (`s = alpha / r`).
        dropout: adapter dropout probability in `[0, 1)`.
        dropout_position: `"pre"` (on the adapter input) or `"post"` (on its output).
        lora_A_init_method: `"xavier"`, `"kaiming"` or `"gaussian"`.
        lora_dtype: adapter dtype; None = the base weight's (bf16, or the layer's
            compute dtype, for a 4-bit base).
        use_triton: use the Triton kernel path (CPU falls back to PyTorch math).
        use_rslora: scale by `alpha / sqrt(r)`.

    Raises:
        TypeError: `linear` is not an `nn.Linear`.
        ValueError: it already has an adapter, or a hyper-parameter is invalid.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"patch_linear_module needs an nn.Linear (or subclass), got {type(linear).__name__}")
    if is_lora_module(linear):
        raise ValueError(
            f"this {linear._lora_base_cls.__name__} already has a LoRA adapter (rank {linear.lora_dim}); "
            "call remove_lora(model) first to replace it"
        )
    validate_adapter_hparams(dim, alpha, dropout, dropout_position, lora_A_init_method, owner="patch_linear_module")
    base_cls = type(linear)
    _add_adapter(linear, dim, alpha, dropout, dropout_position, lora_A_init_method, lora_dtype, use_rslora)
    linear.__class__ = _lora_class_for(TritonLinearLoRA if use_triton else LinearLoRA, base_cls)
    return linear


def _add_adapter(
    linear: nn.Linear,
    dim: int,
    alpha: float,
    dropout: float,
    dropout_position: str,
    lora_A_init_method: str,
    lora_dtype: torch.dtype | str | None,
    use_rslora: bool,
) -> None:
    """Freeze the base and attach `lora_A`, `lora_B`, `lora_dropout` and the settings."""
    lora_dtype = dtype_from_str(lora_dtype, "lora_dtype")
    if lora_dtype is None:
        lora_dtype = quantized_compute_dtype(linear) if is_quantized_linear(linear) else linear.weight.dtype
    device = linear.weight.device
    for param in linear.parameters(recurse=False):
        param.requires_grad_(False)
    linear.lora_A = nn.Linear(linear.in_features, dim, bias=False, device=device, dtype=lora_dtype)
    linear.lora_B = nn.Linear(dim, linear.out_features, bias=False, device=device, dtype=lora_dtype)
    linear.lora_dropout = nn.Dropout(p=dropout)
    linear.lora_dim = dim
    linear.lora_alpha = alpha
    linear.lora_use_rslora = use_rslora
    linear.lora_scale = lora_scale(alpha, dim, use_rslora)
    linear.lora_dropout_position = dropout_position
    linear.lora_A_init_method = lora_A_init_method
    linear.lora_merged = False
    LinearLoRA.reset_lora_parameters(linear)


_LORA_ATTRIBUTES = (
    "lora_dim",
    "lora_alpha",
    "lora_use_rslora",
    "lora_scale",
    "lora_dropout_position",
    "lora_A_init_method",
    "lora_merged",
)


def output_head_names(model: nn.Module) -> set[str]:
    """FQNs of the model's output head: `lm_head` or whatever `get_output_embeddings()` returns."""
    names = {name for name, _ in model.named_modules() if name == "lm_head" or name.endswith(".lm_head")}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        names |= {name for name, m in model.named_modules() if m is head}
    return names


def apply_lora_to_linear_modules(model: nn.Module, peft_config: PeftConfig | dict) -> int:
    """Freeze `model` and patch, in place, every linear module that `peft_config` selects.

    Args:
        model: any `nn.Module` (a model built on the meta device too).
        peft_config: a `PeftConfig`, or a dict for `PeftConfig.from_dict`.

    Returns:
        The number of modules patched.

    Raises:
        ValueError: the config selects nothing (the message lists linear modules
            that exist), a plain target names a non-linear module, or a selected
            module already has an adapter. The model is left untouched.
    """
    cfg = PeftConfig.from_dict(peft_config) if isinstance(peft_config, dict) else peft_config
    matcher = ModuleMatcher(cfg.target_modules, cfg.exclude_modules, cfg.match_all_linear, output_head_names(model))
    adapter_children = {id(child) for _, m in lora_modules(model) for child in (m.lora_A, m.lora_B)}
    selected = []
    for name, module in model.named_modules():
        if id(module) in adapter_children or not matcher.match(module, name):
            continue
        if is_lora_module(module):
            raise ValueError(f"module {name!r} already has a LoRA adapter; call remove_lora(model) before re-applying")
        selected.append(module)
    if not selected:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in adapter_children]
        raise ValueError(
            f"PeftConfig(target_modules={cfg.target_modules!r}, exclude_modules={cfg.exclude_modules!r}, "
            f"match_all_linear={cfg.match_all_linear}) matches no linear module of {type(model).__name__}. "
            f"It has {len(linear_names)} linear modules, e.g. {linear_names[:8]}; "
            "a plain name matches a FQN or its dotted suffix ('q_proj'), a glob the whole FQN ('*.mlp.*')"
        )
    model.requires_grad_(False)
    for module in selected:
        patch_linear_module(
            module,
            dim=cfg.dim,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            dropout_position=cfg.dropout_position,
            lora_A_init_method=cfg.lora_A_init,
            lora_dtype=cfg.lora_dtype,
            use_triton=cfg.use_triton,
            use_rslora=cfg.use_rslora,
        )
    if cfg.recompute_mlp_input:
        recompute_mlp_inputs(model)
    return len(selected)


def init_lora_weights(model: nn.Module) -> int:
    """Initialise every adapter of `model` (after `to_empty` on a meta-built model). Returns the count."""
    modules = lora_modules(model)
    for _, module in modules:
        module.reset_lora_parameters()
    return len(modules)


@torch.no_grad()
def _fold(module: LinearLoRA, name: str, sign: float) -> None:
    if is_quantized_linear(module):
        raise ValueError(
            f"cannot merge the adapter of {name!r} into its {module._lora_base_cls.__name__} base: "
            "the base weight is quantized (4-bit), and adding B @ A to it would need a dequantize / requantize "
            "round trip that loses the adapter's precision. Keep the adapter separate, or merge into a "
            "bf16 copy of the base model loaded without quantization"
        )
    weight = module.weight
    delta = (module.lora_B.weight.float() @ module.lora_A.weight.float()) * (sign * module.lora_scale)  # (N, K)
    weight.copy_((weight.float() + delta).to(weight.dtype))


def _check_untied(model: nn.Module, modules: list[tuple[str, LinearLoRA]]) -> None:
    """Refuse to merge into a weight that another module shares (tied embeddings): it would change both."""
    names_of: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(pname)
    for name, module in modules:
        sharers = [n for n in names_of.get(id(module.weight), []) if n != (f"{name}.weight" if name else "weight")]
        if sharers:
            raise ValueError(
                f"cannot merge the adapter of {name!r}: its weight is shared with {sharers} (tied weights), so "
                "merging would change those modules too. Untie the weights first (e.g. clone the weight into a "
                "new nn.Parameter) or keep the adapter unmerged"
            )


def merge_lora(model: nn.Module) -> int:
    """Fold `s * B @ A` into each adapted base weight; adapters are then skipped in forward.

    Returns:
        The number of modules merged (already merged ones are left as they are).

    Raises:
        ValueError: an adapted base is 4-bit quantized, or its weight is tied to another module's
            (nothing is changed then).
    """
    pending = [(n, m) for n, m in lora_modules(model) if not m.lora_merged]
    _check_untied(model, pending)
    for name, module in pending:
        if is_quantized_linear(module):
            _fold(module, name, 1.0)  # raises with the reason
    for name, module in pending:
        _fold(module, name, 1.0)
        module.lora_merged = True
    return len(pending)


def unmerge_lora(model: nn.Module) -> int:
    """Undo `merge_lora`: subtract `s * B @ A` again (exact up to the base dtype's rounding)."""
    merged = [(n, m) for n, m in lora_modules(model) if m.lora_merged]
    for name, module in merged:
        _fold(module, name, -1.0)
        module.lora_merged = False
    return len(merged)


def remove_lora(model: nn.Module, merge: bool = False) -> int:
    """Take every adapter off and give each module back its original class.

    Args:
        model: a model with adapters.
        merge: fold the adapters into the base weights first (as `merge_lora`);
            otherwise merged adapters are unmerged so the base is the original.

    Returns:
        The number of modules restored.
    """
    if merge:
        merge_lora(model)
    else:
        unmerge_lora(model)
    restore_mlp_classes(model)
    modules = lora_modules(model)
    for _, module in modules:
        del module.lora_A, module.lora_B, module.lora_dropout
        for attr in _LORA_ATTRIBUTES:
            delattr(module, attr)
        module.__class__ = module._lora_base_cls
    return len(modules)
