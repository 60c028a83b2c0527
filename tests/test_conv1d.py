"""transformers `Conv1D` (GPT-2: weight stored `(in, out)`, forward `x @ W + b`) adapted in place like a linear
(PEFT's `fan_in_fan_out`): both layer classes against a float64 reference, GPT-2 matching, PEFT save / load.

Under ``TRITON_INTERPRET=1`` the fused class runs the Triton kernels on the CPU (weight given as the
transposed view of the stored `(in, out)` weight)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import automodel_lora as al
from automodel_lora.lora import Conv1DLoRA, FusedConv1DLoRA, FusedLinearLoRA, LinearLoRA, patch_linear_module

from .conftest import assert_close

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])
CONV1D_NAMES = {f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize_lora_B(model):
    with torch.no_grad():
        for _, m in al.lora_modules(model):
            m.lora_B.weight.normal_(std=0.05)


@pytest.mark.parametrize("use_triton", [False, True])
def test_patched_conv1d_forward_backward_match_float64_reference(use_triton):
    layer = Conv1D(24, 16)  # nf=24 (out), nx=16 (in): weight (16, 24)
    with torch.no_grad():
        layer.bias.normal_()
    weight, bias = layer.weight, layer.bias
    patch_linear_module(layer, dim=4, alpha=8, use_triton=use_triton)
    assert layer.weight is weight and layer.bias is bias and tuple(weight.shape) == (16, 24)
    assert isinstance(layer, Conv1D) and isinstance(layer, FusedConv1DLoRA if use_triton else Conv1DLoRA)
    assert (layer.in_features, layer.out_features) == (16, 24)
    assert tuple(layer.lora_A.weight.shape) == (4, 16) and tuple(layer.lora_B.weight.shape) == (24, 4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    A64 = layer.lora_A.weight.detach().double().requires_grad_()
    B64 = layer.lora_B.weight.detach().double().requires_grad_()
    s = layer.lora_settings.scale
    y64 = x64 @ weight.double() + bias.double() + s * (x64 @ A64.t()) @ B64.t()
    y64.backward(dy.double())
    assert_close(y, y64, torch.float32, what="y")
    assert_close(x.grad, x64.grad, torch.float32, what="dx")
    assert_close(layer.lora_A.weight.grad, A64.grad, torch.float32, what="dA")
    assert_close(layer.lora_B.weight.grad, B64.grad, torch.float32, what="dB")
    assert weight.grad is None and bias.grad is None


def test_fused_path_passes_the_transposed_view_without_a_copy(monkeypatch):
    import automodel_lora.lora as lora_mod

    layer = patch_linear_module(Conv1D(24, 16), dim=4)
    seen = {}
    real = lora_mod.lora_linear

    def spy(x, weight, *args, **kwargs):
        seen["weight"] = weight
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(lora_mod, "lora_linear", spy)
    layer(torch.randn(2, 16))
    w = seen["weight"]
    assert tuple(w.shape) == (24, 16) and w.data_ptr() == layer.weight.data_ptr() and w.stride() == (1, 24)


def test_state_dict_keys_unchanged_except_lora_keys_and_remove_restores_the_class():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4))
    after = model.state_dict()
    added = set(after) - set(before)
    assert set(before) <= set(after)
    assert added == {f"{n}.lora_{x}.weight" for n in CONV1D_NAMES for x in "AB"}
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert al.remove_lora(model) == len(CONV1D_NAMES)
    for name, module in model.named_modules():
        assert not isinstance(module, LinearLoRA), name
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert set(model.state_dict()) == set(before)
    assert_close(logits(model), logits(tiny_gpt2()))


def test_match_all_linear_adapts_exactly_the_conv1d_layers_not_the_head():
    model = tiny_gpt2()
    reference = logits(model)
    assert al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4)) == len(CONV1D_NAMES)
    assert {name for name, _ in al.lora_modules(model)} == CONV1D_NAMES
    assert not isinstance(model.lm_head, LinearLoRA)
    assert all(isinstance(m, FusedLinearLoRA) for _, m in al.lora_modules(model))
    assert_close(logits(model), reference)  # lora_B is zero at init
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("use_triton", [False, True])
def test_plain_name_target_and_training_step(use_triton):
    model = tiny_gpt2()
    cfg = al.PeftConfig(target_modules=["c_attn"], dim=4, alpha=8, use_triton=use_triton)
    assert al.apply_lora_to_linear_modules(model, cfg) == 2
    model(IDS, labels=IDS).loss.backward()
    for _, m in al.lora_modules(model):
        assert m.lora_A.weight.grad is not None and m.lora_B.weight.grad is not None


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def test_adapter_saved_here_loads_in_peft_with_same_logits(tmp_path, peft):
    model = tiny_gpt2()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4, alpha=8))
    randomize_lora_B(model)
    al.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    peft_model = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    assert_close(logits(peft_model), logits(model), what="PEFT logits")
    assert not torch.allclose(logits(model), logits(tiny_gpt2()))
    fresh = tiny_gpt2()
    assert al.load_adapter(fresh, tmp_path) == len(CONV1D_NAMES)
    assert_close(logits(fresh), logits(model), what="reloaded logits")


@pytest.mark.parametrize("use_triton", [False, True])
def test_adapter_trained_with_peft_loads_here_with_same_logits(tmp_path, use_triton, peft):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_gpt2(), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_gpt2()
    assert al.load_adapter(model, tmp_path, use_triton=use_triton) == 2
    assert {name for name, _ in al.lora_modules(model)} == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}
    assert_close(logits(model), logits(peft_model), what="logits")
    assert not torch.allclose(logits(model), logits(tiny_gpt2()))


def test_a_linear_model_still_saves_fan_in_fan_out_false(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["0"], dim=2))
    al.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_merge_unmerge_remove_and_merge_and_save_fold_the_transposed_delta(tmp_path):
    """A Conv1D stores (in, out): merging adds (s B A)^T. Every merge path gives the adapted logits, and
    unmerging gives the original weights back (fp32 rounding)."""
    model = tiny_gpt2()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4, alpha=8))
    randomize_lora_B(model)
    adapted = logits(model)

    assert al.merge_and_save(model, tmp_path / "merged") == len(CONV1D_NAMES)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert_close(logits(reloaded), adapted, what="merge_and_save logits")

    al.merge_lora(model)
    assert_close(logits(model), adapted, what="merged logits")
    al.unmerge_lora(model)
    for name in CONV1D_NAMES:
        assert_close(model.get_submodule(name).weight, original[f"{name}.weight"], what=f"{name} unmerged")

    al.remove_lora(model, merge=True)
    assert all(type(model.get_submodule(n)) is Conv1D for n in CONV1D_NAMES)
    assert_close(logits(model), adapted, what="remove_lora(merge=True) logits")


def test_a_glob_target_selects_unpatched_conv1d_layers():
    """The typo check sees Conv1D layers as adaptable: `*.c_attn` is no typo on gpt2."""
    model = tiny_gpt2()
    n = al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["*.c_attn"], dim=4))
    assert n == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("base_gemm", ["auto", "cublas"])
def test_gpu_bf16_conv1d_kernel_path_matches_fp32_reference(base_gemm):
    """GPT-2's c_fc shape (768 -> 3072), 4096 tokens, bf16, on the Triton kernel path: y and dx against the fp32
    math of `x W + b + s (x A^T) B^T` on the same bf16 values; dA and dB (sums over 4096 tokens of bf16 products,
    whose elementwise error is not bounded relative to each element) against the same kernels run on an
    `nn.Linear` holding `W^T`, the layout the linear tests check against their reference."""
    from transformers.pytorch_utils import Conv1D

    from automodel_lora import KernelOptions

    torch.manual_seed(0)
    conv = Conv1D(3072, 768).to("cuda", torch.bfloat16)
    linear = nn.Linear(768, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    for layer in (conv, linear):
        al.patch_linear_module(layer, dim=16, alpha=32, kernels=KernelOptions(base_gemm=base_gemm))
    with torch.no_grad():
        conv.lora_B.weight.normal_(std=0.05)
        linear.lora_A.weight.copy_(conv.lora_A.weight)
        linear.lora_B.weight.copy_(conv.lora_B.weight)
    x = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    linear(x2).backward(g)
    xf = x.detach().float().requires_grad_()
    A, B = conv.lora_A.weight.detach().float(), conv.lora_B.weight.detach().float()
    ref = xf @ conv.weight.float() + conv.bias.float() + conv.lora_settings.scale * (xf @ A.t()) @ B.t()
    ref.backward(g.float())
    assert_close(y, ref, torch.bfloat16, what="y")
    assert_close(x.grad, xf.grad, torch.bfloat16, what="dx")
    assert_close(conv.lora_A.weight.grad, linear.lora_A.weight.grad, torch.bfloat16, what="dA vs the linear's")
    assert_close(conv.lora_B.weight.grad, linear.lora_B.weight.grad, torch.bfloat16, what="dB vs the linear's")
