"""`recompute_mlp_input`: down_proj's input made again in backward, bit for bit, and not kept from forward."""

from __future__ import annotations

import copy
import gc
import io
import weakref

import pytest
import torch

from automodel_lora import PeftConfig, apply_lora_to_linear_modules, remove_lora
from automodel_lora.recompute import GatedMLPRecompute, recompute_mlp_inputs

from .conftest import ToyModel, tiny_llama

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapted(recompute: bool, use_triton: bool = True, dropout: float = 0.0, position: str = "post", **cfg):
    model = tiny_llama().train()
    apply_lora_to_linear_modules(model, PeftConfig(
        target_modules=ALL_PROJ, dim=4, alpha=8, dropout=dropout, dropout_position=position,
        use_triton=use_triton, recompute_mlp_input=recompute, **cfg,
    ))
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.model.embed_tokens.weight.requires_grad_(True)  # backward through every layer, as the benchmark model
    return model


def _loss_and_grads(model, ids, seed=3):
    torch.manual_seed(seed)  # dropout draws the same masks in both models
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("dropout,position", [(0.0, "post"), (0.2, "pre"), (0.2, "post")])
def test_loss_and_grads_bit_identical_with_recompute(use_triton, dropout, position):
    ids = torch.randint(0, 128, (2, 9))
    kept = _adapted(False, use_triton, dropout, position)
    remade = _adapted(True, use_triton, dropout, position)
    assert sum(isinstance(m, GatedMLPRecompute) for m in remade.modules()) == 2
    assert not any(isinstance(m, GatedMLPRecompute) for m in kept.modules())
    loss_k, grads_k = _loss_and_grads(kept, ids)
    loss_r, grads_r = _loss_and_grads(remade, ids)
    assert torch.equal(loss_k, loss_r)
    assert grads_k.keys() == grads_r.keys() and any("down_proj.lora_A" in n for n in grads_r)
    for name in grads_k:
        assert torch.equal(grads_k[name], grads_r[name]), name


def _mlp_input_ref(model, layer: int = 0):
    """A weak reference to the tensor down_proj of `layer` receives in the next forward."""
    refs = []

    def grab(module, args):
        refs.append(weakref.ref(args[0]))

    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(grab)
    return refs, handle


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("recompute", [True, False])
def test_down_proj_input_is_not_kept_until_backward(use_triton, recompute):
    model = _adapted(recompute, use_triton)
    mlp = model.model.layers[0].mlp
    x = torch.randn(9, 32, requires_grad=True)  # 2-D: the kernels save h itself, no reshaped view of it
    refs, handle = _mlp_input_ref(model)
    out = mlp(x)
    handle.remove()
    gc.collect()
    assert (refs[0]() is None) == recompute  # kept from forward to backward only without the recompute
    out.square().sum().backward()
    assert mlp.down_proj.lora_A.weight.grad is not None


def test_recompute_falls_back_where_the_recipe_would_not_hold():
    model = _adapted(True)
    mlp = model.model.layers[0].mlp
    # gate / up frozen and x without grad: autograd would not keep g and u, so h is kept instead
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.lora_A.weight.requires_grad_(False)
        proj.lora_B.weight.requires_grad_(False)
    refs, handle = _mlp_input_ref(model)
    out = mlp(torch.randn(9, 32))
    handle.remove()
    gc.collect()
    assert refs[0]() is not None
    out.sum().backward()
    assert mlp.down_proj.lora_A.weight.grad is not None


def test_recompute_under_activation_checkpointing_matches():
    ids = torch.randint(0, 128, (2, 9))
    ref = _adapted(False)
    ckpt = _adapted(True)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ref, grads_ref = _loss_and_grads(ref, ids)
    loss_ck, grads_ck = _loss_and_grads(ckpt, ids)
    torch.testing.assert_close(loss_ck, loss_ref, rtol=0, atol=1e-6)
    for name in grads_ref:
        torch.testing.assert_close(grads_ck[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gate_output_changed_in_place_after_forward_raises():
    model = _adapted(True)
    mlp = model.model.layers[0].mlp
    outputs = []
    handle = mlp.gate_proj.register_forward_hook(lambda m, a, out: outputs.append(out))
    out = mlp(torch.randn(9, 32, requires_grad=True))
    handle.remove()
    with torch.no_grad():
        outputs[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place.*recompute_mlp_input=False"):
        out.sum().backward()


def test_names_state_dict_pickle_and_remove():
    plain = tiny_llama()
    model = _adapted(True)
    keys = set(model.state_dict())
    assert {k for k in keys if "lora_" not in k} == set(plain.state_dict())
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(clone(input_ids=ids).logits, want)
        assert torch.equal(loaded(input_ids=ids).logits, want)
    remove_lora(model)
    assert not any(isinstance(m, GatedMLPRecompute) for m in model.modules())
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert set(model.state_dict()) == set(plain.state_dict())


def test_only_listed_mlps_with_an_adapted_down_proj_switch():
    toy = ToyModel()
    apply_lora_to_linear_modules(toy, PeftConfig(match_all_linear=True))
    assert recompute_mlp_inputs(toy) == 0
    model = tiny_llama()
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=["gate_proj", "up_proj"]))
    assert not any(isinstance(m, GatedMLPRecompute) for m in model.modules())


def test_recompute_flag_must_be_bool():
    with pytest.raises(ValueError, match="recompute_mlp_input must be true or false"):
        PeftConfig(target_modules=["q_proj"], recompute_mlp_input="yes")


@pytest.mark.parametrize("use_triton", [True, False])
def test_torch_compile_fullgraph_with_switched_mlps_matches_eager(use_triton):
    """Under torch.compile the switched MLP runs its plain forward (the compiler chooses what to keep):
    one graph, and the same loss and gradients as eager with the recompute."""
    ids = torch.randint(0, 128, (2, 9))
    eager = _adapted(True, use_triton)
    compiled_model = copy.deepcopy(eager)
    loss_e, grads_e = _loss_and_grads(eager, ids)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    loss_c = compiled(input_ids=ids, labels=ids).loss
    loss_c.backward()
    torch.testing.assert_close(loss_c.detach(), loss_e)
    for name, param in compiled_model.named_parameters():
        if name in grads_e:
            torch.testing.assert_close(param.grad, grads_e[name], msg=name)
