"""``train.fused_norm: liger``: the model's RMSNorm modules on Liger-Kernel's kernel, swapped in place
(``recipe.fused_norm``).

Runs in two modes:
    pytest tests/test_fused_norm.py                      # the swap's bookkeeping and the refusals
    TRITON_INTERPRET=1 pytest tests/test_fused_norm.py   # + Liger's kernel in the interpreter, against HF's norm
Tests named *_interp run only under the interpreter, with liger_kernel installed (skipped otherwise).

Tolerances (fp32), elementwise ``|a - e| <= rtol |e| + atol max|e|`` against the same model with HF's own norm.
Both compute ``mean(x^2)`` over H = 32 fp32 terms, in another order: a few eps (1.2e-7) of the result, and
``rsqrt`` to ~1 ulp; the normalised output is then within ~4 eps relative. Through two decoder layers and the
head, the loss and every gradient carry those few-eps errors with the order of summation of each matmul
(H = 32, 64 terms): rtol 1e-5, atol 1e-5 of max|e|, the bound ``test_fused_loss.py`` derives for the same
model. A wrong term is far outside: the norm's weight (random here, not ones) or eps wrong moves the loss by
> 1e-3 relative, and a gradient written over the residual branch's (Liger's ``in_place``) by O(1).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from automodel_lora import PeftConfig, apply_lora_to_linear_modules
from automodel_lora.recipe.config import ConfigError, RecipeConfig
from automodel_lora.recipe.fused_norm import FUSED_NORM_CLASSES, use_fused_norm

from .conftest import ToyModel, scaled_check, tiny_llama
from .recipe_helpers import run_recipe, step_losses, tiny_raw_recipe

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (Liger's Triton kernel on the CPU)")
CPU = torch.device("cpu")
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture
def liger(monkeypatch):
    """liger_kernel, with two interpreter gaps closed: it leaves float arguments Python floats (compiled Triton
    makes them fp32 scalars), on which Liger's kernel calls ``eps.to(tl.float32)``; and it has no libdevice, whose
    ``rsqrt`` the kernel calls (``tl.math.rsqrt`` is the same function, which it has)."""
    pytest.importorskip("liger_kernel")
    import numpy as np
    import triton.language as tl
    from liger_kernel.ops import rms_norm
    from triton.runtime import interpreter

    monkeypatch.setattr(rms_norm, "rsqrt", lambda x: tl.math.rsqrt(x))  # looked up when the interpreter has patched it

    convert = interpreter._implicit_cvt

    def with_float_scalars(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", with_float_scalars)


@pytest.fixture
def liger_installed(monkeypatch):
    """The import check passes whether or not liger_kernel is installed (for the refusals)."""
    monkeypatch.setattr("automodel_lora.recipe.fused_norm.liger_available", lambda: True)
    monkeypatch.setattr("automodel_lora.recipe.fused_loss.liger_available", lambda: True)


check = scaled_check(RTOL, ATOL)


def adapted(arch: str) -> nn.Module:
    """A tiny Llama or Qwen2 with LoRA on q/v/down, random lora_B and random norm weights (so both count)."""
    if arch == "llama":
        model = tiny_llama()
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(1234)
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                             max_position_embeddings=64, tie_word_embeddings=False)).eval()
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=["q_proj", "v_proj", "down_proj"], dim=4, alpha=8))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name or "norm" in name:
            nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.3)
    return model


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss and the gradients of the adapters and of the input embeddings' output (the residual stream)."""
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}
    return loss.detach(), {**grads, "inputs_embeds": embeds.grad}


@interp_only
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loss_and_gradients_equal_the_models_own_norm_interp(liger, arch):
    model = adapted(arch).train()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    plain_loss, plain = loss_and_grads(model, ids)
    n = use_fused_norm(model, CPU)
    assert n == 2 * 2 + 1  # two per decoder layer and the final norm
    loss, fused = loss_and_grads(model, ids)
    check(loss, plain_loss, "loss")
    assert fused.keys() == plain.keys() and len(plain) == 2 * 3 * 2 + 1
    for name in plain:
        check(fused[name], plain[name], name)


@interp_only
@pytest.mark.slow
def test_a_recipe_run_gives_the_plain_norms_losses_interp(liger, tmp_path):
    train = {"max_steps": 2, "batch_size": 2, "eval_max_batches": 1}
    runs = {}
    for setting in (False, "liger"):
        out = tmp_path / str(setting)
        raw = tiny_raw_recipe(tmp_path, train={**train, "fused_norm": setting}, checkpoint={"output_dir": str(out)},
                              peft={"match_all_linear": False, "target_modules": ["q_proj", "v_proj"]})
        raw["data"]["seq_len"] = 16
        summary, log = run_recipe(raw)
        runs[setting] = (summary, step_losses(out), log)
    (plain_summary, plain, _), (fused_summary, fused, log) = runs[False], runs["liger"]
    assert "[fused_norm] 5 RMSNorm modules run Liger-Kernel's RMSNorm kernel" in log
    assert plain.keys() == fused.keys() == {1, 2}
    for step in plain:
        assert fused[step] == pytest.approx(plain[step], rel=RTOL), step
    assert fused_summary["val_loss_after"] == pytest.approx(plain_summary["val_loss_after"], rel=RTOL)


# ------------------------------------------------------------------------------- the swap's bookkeeping


def test_the_swap_keeps_names_objects_and_the_class(liger_installed, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = adapted("llama")
    before = {n: m for n, m in model.named_modules()}
    keys = list(model.state_dict())
    assert use_fused_norm(model, CPU) == 5
    assert use_fused_norm(model, CPU) == 5  # a second call finds them swapped and changes nothing
    after = {n: m for n, m in model.named_modules()}
    assert list(model.state_dict()) == keys and all(after[n] is m for n, m in before.items())
    norm = model.model.layers[0].input_layernorm
    assert type(norm).__name__ == "LigerLlamaRMSNorm" and type(norm).__mro__[1].__name__ == "LlamaRMSNorm"
    assert type(norm) is type(model.model.norm)  # one subclass per norm class
    assert "LlamaRMSNorm" in FUSED_NORM_CLASSES


# ------------------------------------------------------------------------------------------ what it refuses


def test_a_model_without_a_listed_norm_is_refused(liger_installed, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match=r"ToyModel has none of the RMSNorm classes .* Set train.fused_norm=false"):
        use_fused_norm(ToyModel(), CPU)


def test_the_cpu_without_the_interpreter_is_refused(liger_installed, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match=r"runs a Triton kernel: the device is cpu.*train.fused_norm=false"):
        use_fused_norm(adapted("llama"), CPU)


def test_liger_not_installed_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr("automodel_lora.recipe.fused_loss.liger_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs the liger_kernel package.*pip install liger-kernel"):
        RecipeConfig.from_dict(tiny_raw_recipe(tmp_path, train={"fused_norm": "liger"}))


@pytest.mark.parametrize("value", ["rms", True, "Liger"])
def test_an_unknown_value_names_it_and_the_fix(tmp_path, value):
    with pytest.raises(ConfigError, match=r"`train.fused_norm` must be false, liger or auto; got .*Set train.fused_norm=liger"):
        RecipeConfig.from_dict(tiny_raw_recipe(tmp_path, train={"fused_norm": value}))


def test_compile_is_refused(tmp_path, liger_installed):
    with pytest.raises(ConfigError, match=r"`train.fused_norm: liger` with `train.compile: true`"):
        RecipeConfig.from_dict(tiny_raw_recipe(tmp_path, train={"fused_norm": "liger", "compile": True}))


def test_the_default_is_false(tmp_path):
    assert RecipeConfig.from_dict(tiny_raw_recipe(tmp_path)).train.fused_norm is False


# ------------------------------------------------------------------------------------- auto: both switches


def _auto_run(tmp_path, **train):
    raw = tiny_raw_recipe(tmp_path, train={"max_steps": 1, "batch_size": 2, "eval_max_batches": 1,
                                           "fused_loss": "auto", "fused_norm": "auto", **train},
                          peft={"match_all_linear": False, "target_modules": ["q_proj"]},
                          checkpoint={"output_dir": str(tmp_path / "run")})
    raw["data"]["seq_len"] = 16
    return run_recipe(raw)[1]


@pytest.mark.skipif(INTERPRET, reason="the CPU without the interpreter: auto finds no device for Liger")
def test_auto_on_the_cpu_runs_the_plain_paths_and_says_why(tmp_path, liger_installed):
    log = _auto_run(tmp_path)
    assert "[fused_loss] plain (train.fused_loss=auto, no Liger here: " in log and "the device is cpu" in log
    assert "[fused_norm] plain (train.fused_norm=auto, no Liger here: " in log


def test_auto_without_liger_installed_runs_the_plain_paths(tmp_path, monkeypatch):
    monkeypatch.setattr("automodel_lora.recipe.fused_loss.liger_available", lambda: False)
    log = _auto_run(tmp_path)
    for setting in ("fused_loss", "fused_norm"):
        assert (f"[{setting}] plain (train.{setting}=auto, no Liger here: `train.{setting}: liger` needs the "
                "liger_kernel package, which is not installed") in log


def test_auto_with_compile_runs_the_plain_paths(tmp_path, liger_installed):
    from automodel_lora.recipe.config import RecipeConfig as Config

    raw = tiny_raw_recipe(tmp_path, train={"fused_loss": "auto", "fused_norm": "auto", "compile": True})
    assert Config.from_dict(raw).train.fused_norm == "auto"  # accepted: it resolves to the plain path at setup


@interp_only
@pytest.mark.slow
def test_auto_under_the_interpreter_takes_both_liger_kernels_interp(liger, tmp_path):
    log = _auto_run(tmp_path)
    assert "[fused_loss] fused linear + cross-entropy (Liger)" in log
    assert "[fused_norm] 5 RMSNorm modules run Liger-Kernel's RMSNorm kernel" in log


_NORM_MODULES = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2",
                 "Qwen3RMSNorm": "qwen3", "Qwen3MoeRMSNorm": "qwen3_moe", "MixtralRMSNorm": "mixtral",
                 "Phi3RMSNorm": "phi3"}


@pytest.mark.parametrize("name", FUSED_NORM_CLASSES)
def test_each_listed_norm_computes_what_the_kernel_is_told(name):
    """Each listed class, as the installed transformers defines it, computes ``w * (x * rsqrt(mean(x^2) + eps))``
    with the statistics in fp32 and the cast to x's dtype before the weight (Liger's "llama" mode, no offset):
    equal to the bit in bf16, the same operations in the same order."""
    import importlib

    module = importlib.import_module(f"transformers.models.{_NORM_MODULES[name]}.modeling_{_NORM_MODULES[name]}")
    norm = getattr(module, name)(24, eps=1e-5).to(torch.bfloat16)
    torch.manual_seed(0)
    nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    x = torch.randn(5, 24, dtype=torch.bfloat16) * 3
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert norm.variance_epsilon == 1e-5
    assert torch.equal(norm(x), expected)
