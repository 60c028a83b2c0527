"""The arms of the model section (bench_model.py): each a model built from one frozen base (deep copies of
it), every adapted arm with the same adapters (r = 16, alpha = 32, on the 7 projections).

  frozen     the base itself, nothing adapted; backward runs through every layer (see ``frozen_arm``)
  triton     automodel_lora, its defaults (Triton kernels, recompute_mlp_input)
  peft       HF PEFT ``LoraConfig`` defaults: adapters kept in fp32 (``autocast_adapter_dtype=True``)
  peft_bf16  HF PEFT with the adapters in the base's bf16 (``autocast_adapter_dtype=False``)
  axolotl    ``peft_bf16`` with axolotl's fused kernels bound (bench_axolotl.py: LoRA_MLP, LoRA_QKV, LoRA_O)
  triton_graphed  ``triton`` with each step replayed as a CUDA graph (``automodel_lora.GraphedStep``), as the
             recipe runs one process on packed data (``train.cuda_graphs: auto``)
  frozen_graphed  ``frozen`` replayed as a CUDA graph: the frozen model without its host time, the stricter
             reference for the graphed arm
  triton_compiled / frozen_compiled (optional)  ``triton`` / ``frozen`` under ``torch.compile`` (default mode,
             as the recipe's ``train.compile``): the host's per-module work traced away instead of replayed
Any arm listed with ``_graphed`` after its name is that arm's model under a GraphedStep, with ``_compiled``
that arm's model under ``torch.compile`` (its eager arm must be listed too). Optional (--model-variants):
``torch`` (automodel_lora's PyTorch path), ``triton_no_recompute``
(``recompute_mlp_input=False``), ``triton_act_kept`` (the recompute, with the MLP product as ``act_fn(g) * u``
so autograd keeps act(g) too: the product before ``silu_mul``), ``axolotl_o`` (axolotl with ``LoRA_O`` on each
of q/k/v/o instead of ``LoRA_QKV``), ``torch_dora`` / ``triton_dora`` / ``peft_dora`` / ``axolotl_dora`` (DoRA on the 7
projections: our PyTorch path, our kernels, HF PEFT, PEFT + axolotl's kernels with their norm cache invalidated
each step as an optimizer step does; checked against ``torch_dora``), and the kernel-option variants of
bench_variants.SHARED_TRITON (the ``triton`` model run under other ``KernelOptions``).

The adapters are drawn once, on the reference (automodel_lora's PyTorch path, ``LinearLoRA``: the base
product plus ``s (x A^T) B^T`` in plain torch): A by its default init, B ~ N(0, 0.01) (nonzero, so the
adapters change the logits), and copied into every other arm (cast exactly from bf16 into PEFT's fp32)."""

from __future__ import annotations

import copy

import bench_axolotl
import torch
from bench_variants import SHARED_TRITON
from torch import nn

from automodel_lora import PeftConfig, apply_lora_to_linear_modules, lora_modules

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_ARMS = ["frozen", "triton", "peft", "peft_bf16", "axolotl", "frozen_graphed", "triton_graphed"]
OPTIONAL_ARMS = ["torch", "triton_no_recompute", "triton_act_kept", "axolotl_o", "torch_dora", "triton_dora", "peft_dora",
                 "axolotl_dora", *SHARED_TRITON]
DORA_REFERENCE = "torch_dora"  # the arm the other DoRA arms' logits are checked against
GRAPHED = "_graphed"  # suffix: the arm before it, its steps replayed as a CUDA graph
COMPILED = "_compiled"  # suffix: the arm before it, its model under torch.compile


def eager_arm(name: str) -> str:
    """The arm whose model a ``<arm>_graphed`` or ``<arm>_compiled`` arm runs (``name`` itself for an eager arm)."""
    for suffix in (GRAPHED, COMPILED):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
B_STD = 0.01


def ours(base: nn.Module, r: int, use_triton: bool, recompute: bool = True, use_dora: bool = False) -> nn.Module:
    """A copy of ``base`` with automodel_lora adapters on PROJ."""
    m = copy.deepcopy(base)
    apply_lora_to_linear_modules(m, PeftConfig(target_modules=PROJ, dim=r, alpha=2 * r, use_triton=use_triton,
                                               recompute_mlp_input=recompute, use_dora=use_dora))
    return m


def adapter_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{fqn: (A, B)} of an automodel_lora model."""
    return {fqn: (m.lora_A.weight, m.lora_B.weight) for fqn, m in lora_modules(model)}


@torch.no_grad()
def set_adapters(model: nn.Module, pairs: dict) -> None:
    """``model``'s adapters (automodel_lora's, or a PEFT model's "default" adapter) set to ``pairs``.

    Raises:
        ValueError: the model's adapted modules are not exactly the ones of ``pairs``.
    """
    if hasattr(model, "peft_config"):  # PEFT: <fqn>.lora_A["default"] under base_model.model
        inner = model.base_model.model
        found = {fqn for fqn, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        targets = {fqn: (inner.get_submodule(fqn).lora_A["default"].weight,
                         inner.get_submodule(fqn).lora_B["default"].weight) for fqn in found & set(pairs)}
    else:
        targets = adapter_pairs(model)
        found = set(targets)
    if found != set(pairs):
        raise ValueError(f"adapted modules differ: only in the source {sorted(set(pairs) - found)[:4]}, "
                         f"only in the target {sorted(found - set(pairs))[:4]}")
    for fqn, (A, B) in pairs.items():
        targets[fqn][0].copy_(A)
        targets[fqn][1].copy_(B)


def reference(base: nn.Module, r: int) -> tuple[nn.Module, dict]:
    """(automodel_lora's PyTorch-path model, its adapters): the adapters every arm gets, drawn here."""
    m = ours(base, r, use_triton=False)
    pairs = adapter_pairs(m)
    with torch.no_grad():
        for _, B in pairs.values():
            B.normal_(0, B_STD)
    return m, pairs


def peft_arm(base: nn.Module, r: int, pairs: dict, fp32_adapters: bool, use_dora: bool = False) -> nn.Module:
    """HF PEFT on a copy of ``base``: its defaults (fp32 adapters), or adapters in the base's dtype."""
    import peft

    m = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJ,
                                                                 use_dora=use_dora),
                            autocast_adapter_dtype=fp32_adapters)
    set_adapters(m, pairs)
    return m


def frozen_arm(base: nn.Module) -> nn.Module:
    """``base`` with no weight to train whose backward still runs through every layer, as the adapted arms'.

    The protocol trains the input embedding for that. Where the output head is tied to it (1b, 0.5b), training
    it would also make the head's weight gradient ([vocab, hidden] x tokens, a GEMM no adapted arm runs), so
    there the embedding's output requires grad instead (what HF's ``enable_input_require_grads`` does)."""
    emb = base.get_input_embeddings()
    if emb.weight is base.get_output_embeddings().weight:
        emb.register_forward_hook(lambda module, inputs, out: out.requires_grad_(True))
    else:
        emb.weight.requires_grad_(True)
    return base


class ArmUnavailable(RuntimeError):
    """A peer that this machine cannot run (not installed, no CUDA): skipped with the message as the reason."""


def peer_arm(name: str, base: nn.Module, r: int, pairs: dict) -> nn.Module:
    """A peer's arm: peft, peft_bf16, axolotl, axolotl_o, peft_dora, axolotl_dora."""
    if name.startswith("axolotl"):
        why = bench_axolotl.unavailable()
        if why:
            raise ArmUnavailable(why)
        dora = name.endswith("_dora")
        m = peft_arm(base, r, pairs, fp32_adapters=False, use_dora=dora)  # bf16 adapters, as axolotl gives them
        bench_axolotl.patch_model(m, bench_axolotl.load_kernels(), qkv="linear" if name == "axolotl_o" else "fused")
        if dora:
            bench_axolotl.invalidate_dora_cache_each_step(m)
        return m
    return peft_arm(base, r, pairs, fp32_adapters=name == "peft", use_dora=name.endswith("_dora"))


def keep_act_product(model: nn.Module) -> int:
    """The ``triton_act_kept`` arm: give every swapped MLP's ``act_fn`` a subclass of its own class (the same
    forward), which ``silu_mul`` does not take (it matches activations by exact class), so those MLPs compute
    ``act_fn(g) * u`` and autograd keeps act(g) as well: the product before ``silu_mul``. Returns the count."""
    from automodel_lora.recompute import GatedMLPRecompute

    count = 0
    for module in model.modules():
        if isinstance(module, GatedMLPRecompute):
            cls = type(module.act_fn)
            if cls not in _KEPT_CLASSES:
                _KEPT_CLASSES[cls] = type(f"Kept{cls.__name__}", (cls,), {})
            module.act_fn.__class__ = _KEPT_CLASSES[cls]
            count += 1
    return count


_KEPT_CLASSES: dict[type, type] = {}  # an activation class -> its subclass for keep_act_product


def build_arms(base: nn.Module, r: int, want: list[str]) -> tuple[dict, nn.Module, dict]:
    """(arms {name: model} in ``want``'s order, the reference model, {arm: why it was skipped}).

    A peer that cannot be built here (not installed, no CUDA, its patch refused) is skipped with the reason;
    automodel_lora's arms are not caught."""
    unknown = [n for n in want if eager_arm(n) not in DEFAULT_ARMS + OPTIONAL_ARMS]
    if unknown:
        raise ValueError(f"--model-variants: unknown {unknown}; choose from {DEFAULT_ARMS + OPTIONAL_ARMS}")
    ref, pairs = reference(base, r)
    built, skipped = {}, {}
    for name in want:
        if name in ("frozen", *SHARED_TRITON) or name != eager_arm(name):
            continue  # the base itself (last: its hook or trainable embedding must not be copied), or triton's
        if name in ("torch_dora", "triton_dora"):  # DoRA: magnitudes from ||W|| (B = 0 at patch), as PEFT's
            built[name] = ours(base, r, use_triton=name == "triton_dora", use_dora=True)
            set_adapters(built[name], pairs)
        elif name in ("triton", "triton_no_recompute", "triton_act_kept"):
            built[name] = ours(base, r, use_triton=True, recompute=name != "triton_no_recompute")
            set_adapters(built[name], pairs)
            if name == "triton_act_kept":
                keep_act_product(built[name])
        elif name == "torch":
            built[name] = ref
        else:
            try:
                built[name] = peer_arm(name, base, r, pairs)
            except ArmUnavailable as e:
                skipped[name] = str(e)
            except Exception as e:  # a peer that fails to build: reported in the results and the table
                skipped[name] = f"build failed: {type(e).__name__}: {e}"
            if name in skipped:
                print(f"[model] {name} skipped: {skipped[name]}", flush=True)
    for name in SHARED_TRITON:
        if name in want:
            if "triton" not in built:
                raise ValueError(f"--model-variants: {name} runs the triton arm's model: list triton too")
            built[name] = built["triton"]  # same model, run under OPTION_CHANGES[name]
    if "frozen" in want:
        built["frozen"] = frozen_arm(base)
    for name in want:
        if name != eager_arm(name):
            if eager_arm(name) not in want:
                raise ValueError(f"--model-variants: {name} runs the {eager_arm(name)} arm's model: list it too")
            if name.endswith(GRAPHED) and not torch.cuda.is_available():
                skipped[name] = "CUDA graphs need a CUDA device"
            elif eager_arm(name) in built:
                built[name] = built[eager_arm(name)]
    return {n: built[n] for n in want if n in built}, ref, skipped
