"""DoRA on linears: both layer classes against a plain dense reference (forward, every gradient; fp32, bf16; linear,
Conv1D), the magnitude's gradient by gradcheck, the low-rank norm identity and its cache, dropout, torch.compile,
merge / unmerge / merge_and_save, named adapters. PEFT's format and the recipe are in ``test_dora_io.py``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import automodel_lora as al
from automodel_lora.dora import MAGNITUDE, row_norms, weight_sq_norms

from .conftest import assert_close, tiny_llama
from .test_lora_bias import check, skip_unsupported

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def dora_layer(K=37, N=29, r=4, dtype=torch.float32, use_triton=True, bias=True, **settings):
    """A DoRA-adapted linear with nonzero B and a magnitude away from its init (else DoRA is the identity)."""
    layer = nn.Linear(K, N, bias=bias, dtype=dtype)
    al.patch_linear_module(layer, dim=r, alpha=2 * r, use_dora=True, use_triton=use_triton, **settings)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.2)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(N)).add_(0.05)
    return layer


def dense_reference(layer, x):
    """`m / ||W + s B A||_row * (x W^T + s x A^T B^T) + b` built densely in the inputs' dtype, norm detached."""
    s = layer.lora_settings.scale
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    W = layer.weight.t() if layer.fan_in_fan_out else layer.weight  # (N, K); a Conv1D stores (K, N)
    V = W + s * (B @ A)  # (N, K)
    factor = m / V.detach().norm(dim=1)
    out = factor * (F.linear(x, W) + s * F.linear(F.linear(x, A), B))
    return out if layer.bias is None else out + layer.bias


def grads(layer, x, fn):
    x = x.detach().clone().requires_grad_(True)
    y = fn(layer, x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))
    out = {"y": y.detach(), "dx": x.grad}
    for name in ("lora_A.weight", "lora_B.weight", MAGNITUDE):
        p = layer.get_parameter(name)
        out[name] = p.grad
        p.grad = None
    return out


# ---------------------------------------------------------------------------------------------------------
# the layer math
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_every_gradient_match_the_dense_reference(dtype, use_triton, bias):
    if use_triton:
        skip_unsupported("cpu", dtype)  # under TRITON_INTERPRET=1 the fused path runs the kernels: no bf16 there
    layer = dora_layer(dtype=dtype, use_triton=use_triton, bias=bias)
    x = torch.randn(3, 5, 37, dtype=dtype)
    exact = copy.deepcopy(layer).double()  # the reference: the same values, dense, in float64
    ours, ref = grads(layer, x, lambda m, v: m(v)), grads(exact, x.double(), dense_reference)
    for name in ours:  # gradients are reductions: errors relative to the largest value, normwise (see check)
        check(ours[name], ref[name], dtype, what=name)


@pytest.mark.parametrize("use_triton", [False, True])
def test_a_transformers_conv1d_base_gets_dora_on_its_transposed_weight(use_triton):
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(29, 37)  # weight (in, out) = (37, 29)
    with torch.no_grad():
        layer.bias.normal_()
    W = layer.weight.detach().clone()
    al.patch_linear_module(layer, dim=4, alpha=8, use_dora=True, use_triton=use_triton)
    assert_close(layer.lora_magnitude_vector, W.t().norm(dim=1), what="||W||_row of the (out, in) view")
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.2)
        layer.lora_magnitude_vector.mul_(1.2)
    x = torch.randn(2, 3, 37)
    ours, ref = grads(layer, x, lambda m, v: m(v)), grads(layer, x, dense_reference)
    for name in ours:
        assert_close(ours[name], ref[name], what=name)
    expected = ours["y"]
    al.merge_lora(layer)
    assert_close(layer(x), expected, what="merged Conv1D")
    al.unmerge_lora(layer)
    assert_close(layer.weight, W, what="unmerged Conv1D weight")


def test_a_fresh_dora_adapter_is_the_base_layer_and_its_magnitude_the_row_norms():
    layer = nn.Linear(37, 29)
    W = layer.weight.detach().clone()
    al.patch_linear_module(layer, use_dora=True)
    assert_close(layer.lora_magnitude_vector, W.norm(dim=1), what="magnitude at init")
    assert layer.lora_magnitude_vector.requires_grad and not layer.weight.requires_grad
    x = torch.randn(4, 37)
    assert_close(layer(x), F.linear(x, W, layer.bias), what="output at init")
    assert "lora_magnitude_vector" in layer.state_dict()


def test_the_low_rank_norm_identity_equals_the_dense_norm_and_the_cache_follows_the_weight():
    layer = dora_layer(K=64, N=48, r=8)
    s = layer.lora_settings.scale
    A, B = layer.lora_A.weight, layer.lora_B.weight
    dense = (layer.weight.double() + s * B.double() @ A.double()).norm(dim=1)
    assert_close(row_norms(layer, A, B, s), dense.float(), dtype=torch.float32, what="||W + s B A||_row")
    first = weight_sq_norms(layer)
    assert weight_sq_norms(layer) is first  # cached
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place write bumps the weight's version: the cache is recomputed
    assert_close(weight_sq_norms(layer), 4 * first, what="||W||^2 after W *= 2")
    layer.double()  # a new dtype: recomputed
    assert weight_sq_norms(layer).dtype == torch.float64 and weight_sq_norms(layer) is not first


def test_a_layer_built_in_inference_mode_runs_without_the_cache():
    with torch.inference_mode():  # its weight has no version counter
        layer = dora_layer()
        x = torch.randn(4, 37)
        assert_close(layer(x), dense_reference(layer, x), what="inference-mode layer")


def test_a_meta_built_layer_gets_its_magnitude_from_init_lora_weights():
    with torch.device("meta"):
        layer = nn.Linear(37, 29)
    al.patch_linear_module(layer, use_dora=True)
    assert layer.lora_magnitude_vector.is_meta
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.zero_()
    assert al.init_lora_weights(layer) == 1
    assert_close(layer.lora_magnitude_vector, layer.weight.norm(dim=1), what="magnitude after init_lora_weights")


@pytest.mark.parametrize("use_triton", [False, True])
def test_torch_compile_gives_the_eager_output_and_magnitude_gradient(use_triton):
    layer = dora_layer(use_triton=use_triton)
    x = torch.randn(4, 37)
    eager = grads(layer, x, lambda m, v: m(v))
    compiled = torch.compile(layer, backend="aot_eager")
    for name, value in grads(layer, x, lambda m, v: compiled(v)).items():
        assert_close(value, eager[name], what=f"compiled {name}")


def test_the_magnitude_gradient_passes_gradcheck_in_float64():
    layer = dora_layer(K=7, N=5, r=2, use_triton=False).double()  # adapters train in fp32 at most; checked in fp64
    x = torch.randn(3, 7, dtype=torch.float64)

    def out(magnitude, lora_A, lora_B):
        with torch.no_grad():
            layer.lora_magnitude_vector.copy_(magnitude)
            layer.lora_A.weight.copy_(lora_A)
            layer.lora_B.weight.copy_(lora_B)
        # the norm is a constant to autograd (as PEFT): differentiate through m, and A, B in the numerator
        norm = row_norms(layer, lora_A, lora_B, layer.lora_settings.scale)
        s = layer.lora_settings.scale
        return magnitude / norm * (F.linear(x, layer.weight) + s * F.linear(F.linear(x, lora_A), lora_B)) + layer.bias

    params = [layer.get_parameter(n).detach().clone().requires_grad_(True)
              for n in (MAGNITUDE, "lora_A.weight", "lora_B.weight")]
    assert torch.autograd.gradcheck(lambda m: out(m, params[1].detach(), params[2].detach()), (params[0],))
    # and the layer's own magnitude gradient is that one
    layer.zero_grad()
    g = torch.randn(3, 5, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    m = params[0].detach().clone().requires_grad_(True)
    (out(m, params[1].detach(), params[2].detach()) * g).sum().backward()
    assert_close(layer.lora_magnitude_vector.grad, m.grad, what="d magnitude")


@pytest.mark.parametrize("use_triton", [False, True])
def test_dropout_follows_peft_pre_and_drops_the_low_rank_term_post(use_triton):
    for position in ("pre", "post"):
        layer = dora_layer(use_triton=use_triton, dropout=0.5, dropout_position=position).train()
        x = torch.randn(6, 37)
        torch.manual_seed(7)
        y = layer(x)
        torch.manual_seed(7)
        if position == "pre":  # PEFT: base(x) + (f - 1) * drop(x) W^T + f * s B A drop(x)
            xd = layer.lora_dropout(x)
            f = dense_reference(layer, xd) - F.linear(xd, layer.weight, layer.bias)  # (f-1) z~ + f lora~
            expected = F.linear(x, layer.weight, layer.bias) + f
            assert_close(y, expected, what=f"{position} dropout")
        else:  # (y - b) / f - x W^T is the low-rank term, each element dropped (0) or kept (/ (1 - p))
            s, A, B = layer.lora_settings.scale, layer.lora_A.weight, layer.lora_B.weight
            f = layer.lora_magnitude_vector / row_norms(layer, A, B, s)
            term = (y - layer.bias) / f - F.linear(x, layer.weight)
            full = s * F.linear(F.linear(x, A), B) / 0.5
            kept = (term - full).abs() <= 1e-4 * (1 + full.abs())
            dropped = term.abs() <= 1e-4
            assert bool((kept | dropped).all()) and 0 < int(kept.sum()) < kept.numel(), "post dropout"

        layer.eval()
        assert_close(layer(x), dense_reference(layer, x), what=f"{position} in eval")


def test_use_dora_with_lora_bias_is_refused_as_peft_does():
    with pytest.raises(ValueError, match=r"PeftConfig.use_dora=True with lora_bias=True.*set lora_bias=False"):
        al.PeftConfig(match_all_linear=True, use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match=r"PeftConfig.use_dora must be true or false"):
        al.PeftConfig(match_all_linear=True, use_dora="yes")


# ---------------------------------------------------------------------------------------------------------
# merge, named adapters
# ---------------------------------------------------------------------------------------------------------
def adapted(use_triton=True, **config):
    model = tiny_llama()
    cfg = al.PeftConfig(target_modules=TARGETS, dim=4, alpha=8, use_dora=True, use_triton=use_triton, **config)
    al.apply_lora_to_linear_modules(model, cfg)
    randomize(model)
    return model, cfg


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
            elif name.endswith(MAGNITUDE):
                p.mul_(1 + 0.1 * torch.randn_like(p))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("use_triton", [False, True])
def test_merge_equals_the_unmerged_output_and_unmerge_and_remove_restore_the_base(use_triton):
    model, _ = adapted(use_triton)
    q_proj = model.model.layers[0].self_attn.q_proj
    W, expected = q_proj.weight.detach().clone(), logits(model)
    f = (q_proj.lora_magnitude_vector / row_norms(q_proj, q_proj.lora_A.weight, q_proj.lora_B.weight,
                                                  q_proj.lora_settings.scale))[:, None]  # of the unmerged W
    assert al.merge_lora(model) == 8
    delta = q_proj.lora_settings.scale * q_proj.lora_B.weight @ q_proj.lora_A.weight
    assert_close(q_proj.weight, f * (W + delta), what="merged weight = m/||V|| (W + s B A)")
    assert_close(logits(model), expected, what="merged logits")
    al.unmerge_lora(model)
    assert_close(q_proj.weight, W, what="unmerged weight")
    assert_close(logits(model), expected, what="unmerged logits")
    al.remove_lora(model, merge=True)
    assert not hasattr(q_proj, MAGNITUDE) and "lora" not in " ".join(model.state_dict())
    assert_close(logits(model), expected, what="logits after remove_lora(merge=True)")


def test_merge_and_save_writes_the_dora_merged_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = adapted()
    expected = logits(model)
    assert al.merge_and_save(model, tmp_path) == 8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert list(loaded.state_dict()) == list(tiny_llama().state_dict())
    assert_close(logits(loaded), expected, what="logits of the merged checkpoint")


def test_a_nan_magnitude_refuses_the_merge_and_changes_nothing():
    model, _ = adapted()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_magnitude_vector[3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"down_proj.*non-finite.*DoRA magnitude"):
        al.merge_lora(model)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) or v.isnan().any() for k, v in before.items())
    assert not any(m.lora_merged for _, m in al.lora_modules(model))


def test_named_dora_adapters_switch_with_their_magnitudes():
    model, cfg = adapted()
    expected = logits(model)
    al.apply_lora_to_linear_modules(model, cfg, adapter_name="other")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert "model.layers.0.self_attn.q_proj.lora_inactive.other.lora_magnitude_vector" in model.state_dict()
    mine = q_proj.lora_magnitude_vector
    al.set_adapter(model, "other")
    with torch.no_grad():  # the adapter in place only
        for name, p in model.named_parameters():
            if "lora_inactive" not in name and ("lora_B" in name or name.endswith(MAGNITUDE)):
                p.mul_(0.5).add_(0.01)
    other = logits(model)
    parked = q_proj.lora_inactive["default"]
    assert parked.lora_magnitude_vector is mine and mine.requires_grad == parked.lora_A.weight.requires_grad
    assert q_proj.lora_magnitude_vector.requires_grad  # the adapter in use trains its magnitude
    al.set_adapter(model, "default")
    assert q_proj.lora_magnitude_vector is mine and mine.requires_grad
    assert_close(logits(model), expected, what="default again")
    al.set_adapter(model, "other")
    assert_close(logits(model), other, what="other again")
    with pytest.raises(ValueError, match="cannot combine DoRA adapters"):
        al.add_weighted_adapter(model, ["default", "other"], [0.5, 0.5], "mix")
