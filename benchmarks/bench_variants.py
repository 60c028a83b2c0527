"""What a variant is, for the layer, QLoRA and model sections: the kernel options of each "triton*" variant,
the adapted copy of a linear, and one fwd+bwd step under a variant's options, timed against the others.

Variants that differ only in their kernel options share one adapted layer (or model) and alternate step by
step: ``base_gemm_for`` sets the module's ``KernelOptions`` on each change of variant."""

from __future__ import annotations

import contextlib
import copy

import torch
from bench_common import interleaved, peak_delta_mib
from torch import nn

from automodel_lora import KernelOptions, patch_linear_module, set_kernel_options

try:  # the NF4 dequantize kernel (needs triton)
    from automodel_lora.kernels import nf4 as NF4
except ImportError:  # pragma: no cover
    NF4 = None

# The kernel path's settings per variant (forward and backward): the environment's defaults
# (KernelOptions()), with the base GEMM or the fused projection changed for the variants below.
DEFAULT_OPTIONS = KernelOptions()
OPTION_CHANGES = {"triton_cublas": dict(base_gemm="cublas"), "triton_tma": dict(base_gemm="triton")}

# The default kernels with the skinny products as a pass of their own (not made inside the TMA GEMM)
PROJ_PASS = "triton_proj_pass"
OPTION_CHANGES[PROJ_PASS] = dict(fuse_proj=False)

# The variants that share the "triton" layer / model, run under OPTION_CHANGES[name]
SHARED_TRITON = ("triton_cublas", "triton_tma", PROJ_PASS)

# QLoRA variant whose fused path dequantizes through bitsandbytes' dequantize_4bit instead of the NF4 kernel
BNB_DEQUANT = "triton_bnb_dequant"

# The options last set on each shared adapted layer / model (id -> KernelOptions): set again only on a change
_SET: dict = {}


class Wrap(nn.Module):
    """A linear as the submodule ``lin`` (what HF PEFT's ``target_modules`` names)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def lora_copy(base: nn.Linear, r: int, A0: torch.Tensor, B0: torch.Tensor, use_triton: bool, share_weight=False,
              use_dora: bool = False):
    """(a copy of `base` patched with our adapter set to A0, B0; its trainable params: A, B, and with
    ``use_dora`` the magnitude, ||W||_row)."""
    m = copy.deepcopy(base)
    if share_weight:
        m.weight = base.weight
    patch_linear_module(m, dim=r, alpha=2 * r, use_triton=use_triton, use_dora=use_dora)
    with torch.no_grad():
        m.lora_A.weight.copy_(A0)
        m.lora_B.weight.copy_(B0)
    return m, [m.lora_A.weight, m.lora_B.weight] + ([m.lora_magnitude_vector] if use_dora else [])


@contextlib.contextmanager
def base_gemm_for(name: str, module):
    """``module``'s (an adapted layer or model of a "triton*" variant) KernelOptions set to the variant's for
    everything inside (forward and backward); for BNB_DEQUANT, the NF4 kernel declined as well, so that
    bitsandbytes dequantizes."""
    if name.startswith("triton"):
        options = DEFAULT_OPTIONS.replace(**OPTION_CHANGES.get(name, {}))
        if _SET.get(id(module)) != options:  # variants sharing a module alternate step by step
            set_kernel_options(module, options)
            _SET[id(module)] = options
    nf4_supported = NF4.nf4_supported if NF4 is not None else None
    if name == BNB_DEQUANT:
        NF4.nf4_supported = lambda *_: False
    try:
        yield
    finally:
        if nf4_supported is not None:
            NF4.nf4_supported = nf4_supported


def fwd_bwd(name: str, fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``y = fn(x); y.backward(g)`` under the variant's kernel options."""
    with base_gemm_for(name, fn):
        y = fn(x)
        y.backward(g)
        return y


def layer_steps(variants: dict, xs: list, gs: list) -> tuple[dict, object]:
    """({name: step(i), each variant's fwd+bwd on the i-th of two (x, g) buffers}, prep(i): grads to None)."""
    plist = [p_ for _, ps in variants.values() for p_ in ps]

    def prep(i):
        for xx in xs:
            xx.grad = None
        for p_ in plist:
            p_.grad = None

    def make_step(name, fn):
        def step(i):
            fwd_bwd(name, fn, xs[i % 2], gs[i % 2])
        return step

    return {name: make_step(name, fn) for name, (fn, _) in variants.items()}, prep


def time_layer_variants(variants: dict, xs: list, gs: list, args, sync_each: bool = False) -> tuple[dict, dict]:
    """(median ms, peak MiB) of each variant's fwd+bwd step, alternating two (x, g) buffers, interleaved;
    ``sync_each``: the step's host wall time with the GPU synchronized around it instead of its GPU time
    (see ``interleaved``)."""
    steps, prep = layer_steps(variants, xs, gs)
    times = interleaved(steps, n=args.n, rounds=args.rounds, warmup=args.warmup, prep=prep, sync_each=sync_each)
    return times, {name: peak_delta_mib(step, prep) for name, step in steps.items()}


def forget_options() -> None:
    """Drop the record of options set per module: keyed by ``id``, it would be wrong for a module built later
    at a freed one's address (call it when the adapted models of one shape are freed)."""
    _SET.clear()
