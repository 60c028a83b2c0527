"""`recompute_mlp_input`: down_proj's input made again in backward, bit for bit, and not kept from forward.

The swapped MLP's product is `silu_mul` (SiLU). On the PyTorch path it is ``F.silu(g) * u`` bit for bit, so
the swapped model's loss and gradients equal the unswapped model's exactly. Under ``TRITON_INTERPRET=1``
the kernel path (``use_triton=True``) runs its Triton kernel, fp32 math rounded once: within ~1e-6 relative
of the unswapped model's (``_assert_same``), and bit for bit equal to the same swapped model keeping h.
"""

from __future__ import annotations

import copy
import gc
import io
import os
import weakref

import pytest
import torch

from automodel_lora import PeftConfig, apply_lora_to_linear_modules, remove_lora
from automodel_lora import recompute as rc
from automodel_lora.kernels import HAS_TRITON
from automodel_lora.recompute import GatedMLPRecompute, is_gated_mlp, recompute_mlp_inputs

from .conftest import ToyModel, tiny_llama

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The kernel path's MLP product is a Triton kernel here (not F.silu(g) * u bit for bit)
KERNEL_PRODUCT = os.environ.get("TRITON_INTERPRET", "0") == "1" and HAS_TRITON


def _assert_same(actual, expected, use_triton: bool, what: str = ""):
    """Equal bit for bit, or where the Triton product runs within fp32 rounding (a wrong h is off by > 1e-3)."""
    if use_triton and KERNEL_PRODUCT:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=what)
    else:
        assert torch.equal(actual, expected), what


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


def _count_recipes(monkeypatch) -> list:
    """A list that gets one entry per recipe stored in place of down_proj's input from now on."""
    made = []
    real = rc._RecomputedInput.__init__

    def init(self, *args, **kwargs):
        made.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(rc._RecomputedInput, "__init__", init)
    return made


def _loss_and_grads(model, ids, seed=3):
    torch.manual_seed(seed)  # dropout draws the same masks in both models
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("dropout,position", [(0.0, "post"), (0.2, "pre"), (0.2, "post")])
def test_loss_and_grads_bit_identical_with_recompute(monkeypatch, use_triton, dropout, position):
    ids = torch.randint(0, 128, (2, 9))
    kept = _adapted(False, use_triton, dropout, position)
    remade = _adapted(True, use_triton, dropout, position)
    same_product = copy.deepcopy(remade)  # the swapped MLPs' product, with h kept (no recipe)
    assert sum(isinstance(m, GatedMLPRecompute) for m in remade.modules()) == 2
    assert not any(isinstance(m, GatedMLPRecompute) for m in kept.modules())
    loss_k, grads_k = _loss_and_grads(kept, ids)
    with monkeypatch.context() as patch:
        patch.setattr(rc, "_hooks_are_free", lambda: False)
        loss_s, grads_s = _loss_and_grads(same_product, ids)
    recipes = _count_recipes(monkeypatch)
    loss_r, grads_r = _loss_and_grads(remade, ids)
    # the PyTorch path with dropout on the adapter's input saves the dropped copy, not h: nothing to recompute
    assert len(recipes) == (0 if (not use_triton and position == "pre" and dropout > 0) else 2)
    assert torch.equal(loss_s, loss_r)
    _assert_same(loss_r, loss_k, use_triton, "loss")
    assert grads_k.keys() == grads_r.keys() == grads_s.keys() and any("down_proj.lora_A" in n for n in grads_r)
    for name in grads_k:
        assert torch.equal(grads_s[name], grads_r[name]), name
        _assert_same(grads_r[name], grads_k[name], use_triton, name)


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


@pytest.mark.parametrize("reentrant", [False, True])
def test_recompute_under_activation_checkpointing_matches(monkeypatch, reentrant):
    """Non-reentrant checkpointing is a saved-tensor hook: the MLP steps aside (no recipe). Reentrant
    checkpointing recomputes the layer under plain autograd, where the recipe is used."""
    ids = torch.randint(0, 128, (2, 9))
    ref = _adapted(False)
    ckpt = _adapted(True)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    loss_ref, grads_ref = _loss_and_grads(ref, ids)
    recipes = _count_recipes(monkeypatch)
    loss_ck, grads_ck = _loss_and_grads(ckpt, ids)
    assert len(recipes) == (2 if reentrant else 0)
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


def _mlp_grads(mlp, x, pre_hook=None):
    x = x.detach().clone().requires_grad_(True)
    handle = mlp.down_proj.register_forward_pre_hook(pre_hook) if pre_hook else None
    out = mlp(x)
    if handle:
        handle.remove()
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _pair(use_triton=True, **overrides):
    """The same adapted MLP twice: without and with the recompute."""
    return [_adapted(recompute, use_triton, **overrides).model.layers[0].mlp for recompute in (False, True)]


@pytest.mark.parametrize("use_triton", [True, False])
def test_input_changed_in_place_before_down_proj_saves_it_is_kept(monkeypatch, use_triton):
    """A pre-hook that clamps down_proj's input in place: the recipe would rebuild the unclamped h, so the
    saved tensor is kept instead, and the gradients are those without the recompute."""
    kept, remade = _pair(use_triton)
    x = torch.randn(9, 32)

    def clamp(module, args):
        args[0].clamp_(-0.01, 0.01)

    want = _mlp_grads(kept, x, clamp)
    recipes = _count_recipes(monkeypatch)
    got = _mlp_grads(remade, x, clamp)
    assert recipes == []
    for a, b in zip(got[:2], want[:2], strict=True):
        _assert_same(a, b, use_triton)
    for name in want[2]:
        _assert_same(got[2][name], want[2][name], use_triton, name)


class _MatmulSiLU(torch.nn.SiLU):
    """silu(x @ I): the matmul follows autocast, so its output dtype depends on the autocast state."""

    def forward(self, x):
        return torch.nn.functional.silu(x @ torch.eye(x.shape[-1], dtype=x.dtype))


def test_recipe_replays_the_forward_autocast_state(monkeypatch):
    """Forward without autocast, backward inside bf16 autocast: the recipe rebuilds h as the forward made it
    (fp32), not as autocast would now (bf16)."""
    monkeypatch.setattr(rc, "INPUT_KEEPING_ACTIVATIONS", rc.INPUT_KEEPING_ACTIVATIONS | {"_MatmulSiLU"})
    kept, remade = _pair(use_triton=False)
    for mlp in (kept, remade):
        mlp.act_fn = _MatmulSiLU()
    recompute_mlp_inputs(remade)  # the act changed after apply: switch again
    assert isinstance(remade, GatedMLPRecompute)
    x = torch.randn(9, 32)
    grads = []
    for mlp in (kept, remade):
        xi = x.clone().requires_grad_(True)
        out = mlp(xi)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out.square().sum().backward()
        grads.append({n: p.grad for n, p in mlp.named_parameters() if p.grad is not None})
    assert all(torch.equal(grads[1][n], grads[0][n]) for n in grads[0])


def test_torch_func_grad_and_disabled_hooks_fall_back():
    """torch.func transforms refuse saved-tensor hooks: the MLP keeps h there, as without the recompute."""
    from torch.func import functional_call, grad

    kept, remade = _pair(use_triton=False)
    x = torch.randn(9, 32)
    results = []
    for mlp in (kept, remade):
        params = {k: v.detach() for k, v in mlp.named_parameters() if v.requires_grad}
        results.append(grad(lambda p, x, mlp=mlp: functional_call(mlp, p, (x,)).square().sum())(params, x))
    assert all(torch.equal(results[1][n], results[0][n]) for n in results[0])
    with torch.autograd.graph.disable_saved_tensors_hooks("hooks disabled by the caller"):
        got = _mlp_grads(remade, x)
    want = _mlp_grads(kept, x)
    assert all(torch.equal(got[2][n], want[2][n]) for n in want[2])


def test_torch_without_the_hook_stack_query_falls_back(monkeypatch):
    """torch before 2.8 has no way to ask for the active saved-tensor hooks: no recipe, no error."""
    kept, remade = _pair()
    monkeypatch.setattr(rc, "_TOP_HOOKS", None)  # what the module finds there on such a torch
    recipes = _count_recipes(monkeypatch)
    x = torch.randn(9, 32)
    got, want = _mlp_grads(remade, x), _mlp_grads(kept, x)
    assert recipes == []
    for name in want[2]:
        _assert_same(got[2][name], want[2][name], True, name)


def test_which_mlps_count_as_gated():
    """By forward bytecode and activation, not by class name."""
    from torch import nn

    from .conftest import tiny_llama_config

    class LlamaMLP(nn.Module):  # the right name, another forward
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    class AnyGatedMLP(LlamaMLP):  # another name, the gated forward
        def forward(self, hidden):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))
            return down_proj

    assert not is_gated_mlp(LlamaMLP())
    assert is_gated_mlp(AnyGatedMLP())
    relu = AnyGatedMLP()
    relu.act_fn = nn.ReLU()  # keeps its output: g would be kept for the recipe alone
    assert not is_gated_mlp(relu)
    from transformers import LlamaForCausalLM

    relu_llama = LlamaForCausalLM(tiny_llama_config(hidden_act="relu"))
    apply_lora_to_linear_modules(relu_llama, PeftConfig(target_modules=ALL_PROJ))
    assert not any(isinstance(m, GatedMLPRecompute) for m in relu_llama.modules())


def test_load_adapter_switches_the_mlps(tmp_path):
    from automodel_lora import load_adapter, save_adapter

    model = _adapted(True)
    save_adapter(model, str(tmp_path / "adapter"))
    fresh = tiny_llama()
    load_adapter(fresh, str(tmp_path / "adapter"))
    assert sum(isinstance(m, GatedMLPRecompute) for m in fresh.modules()) == 2
    off = _adapted(False)
    save_adapter(off, str(tmp_path / "off"), peft_config=PeftConfig(target_modules=ALL_PROJ, dim=4, alpha=8,
                                                                     recompute_mlp_input=False))
    fresh = tiny_llama()
    load_adapter(fresh, str(tmp_path / "off"))
    assert not any(isinstance(m, GatedMLPRecompute) for m in fresh.modules())


def test_imports_run_one_way_layer_then_recompute_then_injection():
    """`lora` (the layer) imports neither `recompute` nor `injection`; `recompute` imports `lora` at module
    level (no import inside a function to dodge a circle)."""
    import ast
    import inspect

    import automodel_lora.injection
    import automodel_lora.lora

    def imported(module) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom) and node.level:
                names.add(node.module or "")
        return names

    assert not imported(automodel_lora.lora) & {"recompute", "injection"}
    assert "lora" in imported(rc) and "injection" not in imported(rc)
    top_level = {n.module for n in ast.parse(inspect.getsource(rc)).body if isinstance(n, ast.ImportFrom)}
    assert "lora" in top_level
    assert {"lora", "recompute"} <= imported(automodel_lora.injection)
