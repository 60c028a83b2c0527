"""The axolotl peer (BENCHMARK.md section 4): a PEFT model with bf16 adapters whose layers run axolotl's
fused LoRA kernels (``axolotl.kernels.lora``), set up as axolotl's own patch does
(``axolotl/monkeypatch/lora_kernels.py``: ``apply_lora_kernel_patches`` with ``lora_mlp_kernel``,
``lora_qkv_kernel`` and ``lora_o_kernel`` on):

  mlp       ``mlp.forward = MethodType(apply_lora_mlp_swiglu, mlp)``: ``LoRA_MLP``, gate/up/down and the
            SwiGLU in one autograd node (Triton SwiGLU kernels, cuBLAS GEMMs)
  q, k, v   ``apply_lora_qkv(attn, x)``: ``LoRA_QKV``, the three projections of one input in one node
  o         ``apply_lora_o(attn, x)``: ``LoRA_O`` (``apply_lora_linear`` is the same node for any projection)

axolotl binds ``apply_qkv`` / ``apply_o`` on the attention modules and rewrites the attention class's
forward source to call them. That rewrite changes the class, which every arm of a run shares; here the
kernels are bound to this model's projection modules instead (``FusedQKV``), which computes the same nodes
in the same order. ``qkv="linear"`` gives each of q/k/v its own ``LoRA_O`` node instead (``apply_lora_linear``).

Importing: the kernel modules need torch, triton and bitsandbytes (``quantize.py`` binds its C dequantize
functions at import); their only other axolotl import is ``axolotl.utils.logging``, whose real module pulls
in accelerate and axolotl's distributed helpers to log from the main process: a stub with
``get_logger = logging.getLogger`` stands in for it. Nothing needs liger_kernel (only axolotl's Gemma4 rope
and gated RMSNorm kernels, not imported here).
"""

from __future__ import annotations

import functools
import logging
import sys
import types

import torch
from bench_common import DEV
from torch import nn

MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
QKV_PROJ = ("q_proj", "k_proj", "v_proj")


def load_kernels():
    """``axolotl.kernels.lora``, imported with the logging stub (see the module docstring)."""
    if "axolotl.utils.logging" not in sys.modules:
        stub = types.ModuleType("axolotl.utils.logging")
        stub.get_logger = logging.getLogger
        sys.modules["axolotl.utils.logging"] = stub
    import axolotl.kernels.lora as kernels

    return kernels


def version() -> str | None:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("axolotl")
    except Exception:  # not installed as a distribution (a --target tree without its dist-info)
        return None


def unavailable() -> str | None:
    """Why the axolotl arm cannot run here, or None when it can."""
    if DEV != "cuda":
        return ("axolotl's LoRA kernels launch Triton kernels on CUDA tensors (its SwiGLU allocates on 'cuda'); "
                f"this run is on {DEV}")
    try:
        load_kernels()
    except Exception as e:
        return f"axolotl.kernels.lora does not import: {e!r}"
    return None


class FusedQKV:
    """One attention module's q, k and v from one ``LoRA_QKV`` node (axolotl's ``apply_lora_qkv``).

    Llama and Qwen2 attention call ``q_proj``, ``k_proj``, ``v_proj`` in that order on the same hidden
    states: ``q_proj``'s call runs the node and keeps K and V, which the next ``k_proj`` and ``v_proj`` calls
    on that same tensor return. Any other order or input raises: the patched model would compute something
    else than its attention forward asks for.
    """

    def __init__(self, attn: nn.Module, apply_lora_qkv):
        self.attn, self.apply_lora_qkv = attn, apply_lora_qkv
        self.pending: dict = {}

    def bind(self) -> None:
        self.attn.q_proj.forward = self.q
        self.attn.k_proj.forward = functools.partial(self.take, "k_proj")
        self.attn.v_proj.forward = functools.partial(self.take, "v_proj")

    def q(self, x):
        if self.pending:
            raise RuntimeError(f"axolotl arm: {sorted(self.pending)} of the last q_proj call were never read: "
                               "this attention does not call q_proj, k_proj, v_proj in turn on one input")
        q, k, v = self.apply_lora_qkv(self.attn, x)
        self.pending = {"k_proj": (x, k), "v_proj": (x, v)}
        return q

    def take(self, name: str, x):
        x0, out = self.pending.pop(name, (None, None))
        if x0 is not x:
            raise RuntimeError(f"axolotl arm: {name} called without a q_proj call on the same input before it; "
                               "this attention does not call q_proj, k_proj, v_proj in turn on one input")
        return out


def patch_model(model: nn.Module, kernels, qkv: str = "fused") -> int:
    """Bind axolotl's kernels on every decoder layer of the PEFT model ``model`` (see the module docstring);
    returns the number of layers patched.

    Raises:
        ValueError: ``qkv`` is not "fused" or "linear", the MLP's activation is not SiLU (``LoRA_MLP`` is bound
            with the SwiGLU kernels here), or a projection carries no PEFT adapter.
    """
    if qkv not in ("fused", "linear"):
        raise ValueError(f"qkv={qkv!r}: 'fused' (LoRA_QKV) or 'linear' (LoRA_O per projection)")
    act = getattr(model.config, "hidden_act", None)
    if act != "silu":
        raise ValueError(f"the axolotl arm binds LoRA_MLP with SwiGLU; this model's hidden_act is {act!r}")
    layers = model.base_model.model.model.layers
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for owner, names in ((mlp, MLP_PROJ), (attn, QKV_PROJ + ("o_proj",))):
            missing = [n for n in names if not hasattr(getattr(owner, n), "lora_A")]
            if missing:
                raise ValueError(f"layer {i}: {missing} carry no PEFT LoRA adapter")
        mlp.forward = types.MethodType(kernels.apply_lora_mlp_swiglu, mlp)
        if qkv == "fused":
            FusedQKV(attn, kernels.apply_lora_qkv).bind()
        else:
            for name in QKV_PROJ:
                proj = getattr(attn, name)
                proj.forward = functools.partial(kernels.apply_lora_linear, proj)
        attn.o_proj.forward = functools.partial(kernels.apply_lora_o, attn)
    return len(layers)


def invalidate_dora_cache_each_step(model: nn.Module) -> int:
    """Make axolotl's DoRA arms recompute their norms every step, as they do in training; returns the count.

    axolotl keeps ``||W + s B A||_row`` on the magnitude, keyed on ``A._version`` and ``B._version``, so a
    benchmark that repeats fwd+bwd without an optimizer step would find it cached and skip the norm that every
    training step pays (the optimizer's in-place update bumps both versions). A forward pre-hook on ``model``
    bumps each DoRA layer's ``lora_A`` version with one in-place multiply by 1 (one fused launch for all)."""
    As = [m.lora_A[name].weight for m in model.modules() if getattr(m, "lora_magnitude_vector", None)
          for name in m.lora_magnitude_vector]

    def bump(module, inputs):
        with torch.no_grad():
            torch._foreach_mul_(As, 1.0)

    if As:
        model.register_forward_pre_hook(bump)
    return len(As)
