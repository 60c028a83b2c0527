"""The PyTorch LoRA path: patching in place, forward math, dtypes, meta init, merge/unmerge/remove."""

import copy
import io
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import automodel_lora as al

from .conftest import ToyModel, assert_close, tiny_llama


def reference_lora(x, weight, bias, lora_A, lora_B, scale):
    """y = x W^T + b + s (x A^T) B^T in float64."""
    x, weight, lora_A, lora_B = (t.double() for t in (x, weight, lora_A, lora_B))
    y = x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T
    return y if bias is None else y + bias.double()


def randomize_adapters(model):
    with torch.no_grad():
        for _, m in al.lora_modules(model):
            m.lora_B.weight.normal_(std=0.1)


def test_patch_keeps_identity_names_and_parameter_objects():
    model = tiny_llama()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    params_before = dict(model.named_parameters())
    q_proj = model.model.layers[0].self_attn.q_proj
    n = al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4))
    assert n == 4
    assert model.model.layers[0].self_attn.q_proj is q_proj
    assert isinstance(q_proj, nn.Linear) and isinstance(q_proj, al.LinearLoRA)
    after = model.state_dict(keep_vars=True)
    for key, value in before.items():
        assert after[key] is value, key
    new_keys = sorted(set(after) - set(before))
    expected = sorted(
        f"model.layers.{i}.self_attn.{p}.lora_{ab}.weight" for i in range(2) for p in ("q_proj", "v_proj") for ab in "AB"
    )
    assert new_keys == expected
    assert q_proj.lora_A.weight.shape == (4, 32) and q_proj.lora_B.weight.shape == (32, 4)
    assert dict(model.named_parameters())["model.embed_tokens.weight"] is params_before["model.embed_tokens.weight"]


def test_patched_class_is_built_once_per_pair():
    a, b = nn.Linear(3, 3), nn.Linear(4, 4)
    al.patch_linear_module(a)
    al.patch_linear_module(b)
    assert type(a) is type(b)
    assert type(a).__mro__[1:3] == (al.FusedLinearLoRA, al.LinearLoRA)
    c = al.patch_linear_module(nn.Linear(3, 3), use_triton=False)
    assert type(c) is not type(a) and not isinstance(c, al.FusedLinearLoRA)


def test_trainable_parameters_are_exactly_the_adapters():
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert len(trainable) == 2 * 14


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("shape", [(5, 24), (2, 3, 24), (2, 2, 3, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_reference(use_triton, shape, bias):
    layer = nn.Linear(24, 17, bias=bias)
    al.patch_linear_module(layer, dim=6, alpha=12, use_triton=use_triton)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 17)
    ref_x = x.detach().double().requires_grad_(True)
    ref_A = layer.lora_A.weight.detach().double().requires_grad_(True)
    ref_B = layer.lora_B.weight.detach().double().requires_grad_(True)
    ref = reference_lora(ref_x, layer.weight, layer.bias, ref_A, ref_B, 2.0)
    assert_close(y, ref, what="y")
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    assert_close(x.grad, ref_x.grad, what="dx")
    assert_close(layer.lora_A.weight.grad, ref_A.grad, what="dA")
    assert_close(layer.lora_B.weight.grad, ref_B.grad, what="dB")
    assert layer.weight.grad is None


@pytest.mark.parametrize("use_triton", [False, True])
def test_parametrized_weights_are_read_through_their_parametrization(use_triton):
    """A parametrization on an adapter weight (weight_norm, spectral_norm, ... work this way) or on the base
    weight moves it out of ``_parameters``: the layer must still use the parametrized value."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = al.patch_linear_module(nn.Linear(12, 10), dim=4, alpha=4, use_triton=use_triton)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    parametrize.register_parametrization(layer.lora_A, "weight", Double())
    parametrize.register_parametrization(layer, "weight", Double())
    x = torch.randn(3, 12)
    A, B = layer.lora_A.weight, layer.lora_B.weight  # parametrized values: 2 * the originals
    expected = F.linear(x, layer.weight, layer.bias) + (x @ A.t()) @ B.t()
    assert_close(layer(x), expected)


def test_output_equals_base_at_init_because_B_is_zero():
    layer = nn.Linear(10, 7)
    x = torch.randn(4, 10)
    expected = layer(x)
    al.patch_linear_module(layer)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_dropout_positions_follow_their_formulas(position):
    layer = al.patch_linear_module(nn.Linear(16, 8), dim=4, alpha=4, dropout=0.5, dropout_position=position, use_triton=False)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(6, 16)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    if position == "pre":
        expected = layer.base_forward(x) + F.linear(F.linear(F.dropout(x, 0.5), A), B)
    else:
        expected = layer.base_forward(x) + F.dropout(F.linear(F.linear(x, A), B), 0.5)
    assert_close(y, expected)
    layer.eval()
    assert_close(layer(x), layer.base_forward(x) + F.linear(F.linear(x, A), B))


@pytest.mark.parametrize("use_triton", [False, True])
def test_fp32_adapters_compute_in_activation_dtype_without_fp32_copy_of_x(use_triton):
    layer = nn.Linear(64, 48).to(torch.bfloat16)
    al.patch_linear_module(layer, dim=8, lora_dtype="float32", use_triton=use_triton)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    with torch.no_grad():  # adapter term of the same size as the base term, so bf16 rounding is relative to |y|
        layer.lora_B.weight.normal_(std=0.02)
    x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= x.numel()], saved
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32
    ref = reference_lora(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.lora_settings.scale)
    assert_close(y, ref, dtype=torch.bfloat16)


def test_default_adapter_dtype_follows_base():
    layer = al.patch_linear_module(nn.Linear(4, 4, dtype=torch.float16))
    assert layer.lora_A.weight.dtype == torch.float16


@pytest.mark.parametrize(
    "init, check",
    [
        # uniform inits: the bound holds and the spread is the uniform one (max near the bound),
        # which tells xavier's sqrt(6 / (fan_in + r)) = 0.146 from kaiming's 1 / sqrt(fan_in) = 0.0625
        ("xavier", lambda w, fan_in, fan_out, r: 0.9 < w.abs().max() / math.sqrt(6 / (fan_in + r)) <= 1 + 1e-6),
        ("kaiming", lambda w, fan_in, fan_out, r: 0.9 < w.abs().max() * math.sqrt(fan_in) <= 1 + 1e-6),
        ("gaussian", lambda w, fan_in, fan_out, r: abs(w.std().item() - 1 / r) < 0.1 / r),
    ],
)
def test_lora_A_init_methods(init, check):
    layer = al.patch_linear_module(nn.Linear(256, 64), dim=16, lora_A_init=init)
    w = layer.lora_A.weight
    assert w.abs().sum() > 0 and check(w, 256, 64, 16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_rslora_scale_used_in_forward():
    layer = al.patch_linear_module(nn.Linear(8, 8), dim=16, alpha=8, use_rslora=True)
    assert layer.lora_settings.scale == pytest.approx(2.0)  # alpha / sqrt(dim), not alpha / dim = 0.5
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    delta = x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
    assert_close(layer(x), layer.base_forward(x) + 2.0 * delta, torch.float32)


def test_meta_device_patch_then_to_empty_then_init():
    with torch.device("meta"):
        model = ToyModel()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["fc1"], dim=4))
    layer = model.layers[0]["fc1"]
    assert layer.lora_A.weight.is_meta
    model.to_empty(device="cpu")
    assert al.init_lora_weights(model) == 4
    assert torch.isfinite(layer.lora_A.weight).all() and layer.lora_A.weight.abs().sum() > 0
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_patch_errors():
    with pytest.raises(TypeError, match="Conv1d"):
        al.patch_linear_module(nn.Conv1d(2, 2, 1))
    layer = al.patch_linear_module(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        al.patch_linear_module(layer)
    with pytest.raises(ValueError, match="dim"):
        al.patch_linear_module(nn.Linear(4, 4), dim=0)
    model = ToyModel()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["fc1"]))
    # adding adapters to *other* modules later is fine, and never adapts lora_A / lora_B themselves
    assert al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["fc2"])) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_unmerge_agree_with_adapter_forward_per_layer(dtype):
    layer = al.patch_linear_module(nn.Linear(96, 40, dtype=dtype), dim=8, alpha=16, use_triton=False)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.02)
    x = torch.randn(7, 96, dtype=dtype)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        assert al.merge_lora(layer) == 1 and layer.lora_merged
        with pytest.warns(UserWarning, match="already merged"):
            assert al.merge_lora(layer) == 0  # nothing done
        y_merged = layer(x)
        assert al.unmerge_lora(layer) == 1 and not layer.lora_merged
        y_unmerged = layer(x)
    assert_close(y_merged, y, what="merged")
    assert_close(y_unmerged, y, what="unmerged")
    assert_close(layer.weight, w0, what="weight after unmerge")


def test_merge_whole_model_fp32():
    model = ToyModel()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4))
    randomize_adapters(model)
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        y = model(ids)
        assert al.merge_lora(model) == 12
        assert_close(model(ids), y, what="merged")
        assert al.unmerge_lora(model) == 12
        assert_close(model(ids), y, what="unmerged")


def test_remove_lora_restores_original_classes_and_state_dict():
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True))
    randomize_adapters(model)
    al.merge_lora(model)
    assert al.remove_lora(model) == 14  # unmerges first
    assert {n: type(m) for n, m in model.named_modules()} == classes
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    for k in original:
        assert_close(restored[k], original[k], what=k)


def test_remove_lora_with_merge_keeps_the_adapted_function():
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        expected = model(ids).logits
        al.remove_lora(model, merge=True)
        assert not al.lora_modules(model)
        assert_close(model(ids).logits, expected)


def test_training_moves_only_adapters_and_lowers_loss():
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    # the head is adapted too: with a random 0.02-std init the logits barely move otherwise
    al.apply_lora_to_linear_modules(
        model, al.PeftConfig(target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], dim=8, alpha=16)
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = (torch.arange(16) * 7 % 128).repeat(4, 1)  # a learnable sequence
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())


def test_deepcopy_pickle_and_strict_state_dict_round_trip():
    model = ToyModel()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["fc1"]))
    randomize_adapters(model)
    ids = torch.randint(0, 16, (2, 3))
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    fresh = ToyModel()
    al.apply_lora_to_linear_modules(fresh, al.PeftConfig(target_modules=["fc1"]))
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        expected = model(ids)
        for other in (clone, loaded, unpickled, fresh):
            assert torch.equal(other(ids), expected)


@pytest.mark.parametrize("use_triton", [False, True])
def test_torch_compile_gives_the_same_result_and_gradients(use_triton):
    """Forward and backward through torch.compile (aot_eager traces the autograd graph, so the
    kernel path's custom ops are exercised as opaque nodes) match eager."""
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj"], use_triton=use_triton))
    randomize_adapters(model)
    ids = torch.randint(0, 128, (1, 8))
    adapters = [p for p in model.parameters() if p.requires_grad]
    expected = model(ids).logits
    expected.square().mean().backward()
    expected_grads = [p.grad.clone() for p in adapters]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(ids).logits
    got.square().mean().backward()
    assert_close(got, expected)
    for p, g in zip(adapters, expected_grads, strict=True):
        assert_close(p.grad, g)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_matches_reference(use_triton, base_dtype):
    layer = al.patch_linear_module(nn.Linear(48, 40, dtype=base_dtype), dim=4, alpha=8, use_triton=use_triton)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.02)
    x = torch.randn(2, 9, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = reference_lora(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    assert_close(y, ref, dtype=torch.bfloat16)
    y.float().sum().backward()
    assert x.grad is not None and layer.lora_A.weight.grad is not None and layer.weight.grad is None


def test_merge_refuses_tied_weights_and_changes_nothing():
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["lm_head", "q_proj"]))
    for _, m in al.lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'lm_head'.*shared with \['model.embed_tokens.weight'\]"):
        al.merge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(m.lora_merged for _, m in al.lora_modules(model))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(dim=0), "dim"), (dict(lora_A_init="bogus"), "bogus"), (dict(dropout_position="middle"), "middle")],
)
def test_linear_lora_constructor_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        al.LinearLoRA(8, 4, **kwargs)


def test_whole_model_pickle_loads_in_a_fresh_process(tmp_path):
    """torch.save(model) of a patched Llama (adapted linears and switched MLPs) loads with torch.load in a
    new interpreter, where the generated classes do not exist yet, and gives the same logits."""
    import os
    import subprocess
    import sys

    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    randomize_adapters(model)
    ids = torch.arange(6).view(1, 6)
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, tmp_path / "logits.pt")
    torch.save(model, tmp_path / "model.pt")
    script = (
        "import torch, sys\n"
        f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        f"want = torch.load({str(tmp_path / 'logits.pt')!r})\n"
        "with torch.no_grad():\n"
        "    got = m(input_ids=torch.arange(6).view(1, 6)).logits\n"
        "print(type(m.model.layers[0].mlp.down_proj).__name__, type(m.model.layers[0].mlp).__name__)\n"
        "sys.exit(0 if torch.equal(got, want) else 3)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FusedLinearLoRA" in done.stdout and "Recompute_" in done.stdout


# ---------------------------------------------------------------------------------------------------------
# One settings object per module, kernel options per module, deprecated names
# ---------------------------------------------------------------------------------------------------------


def test_module_keeps_one_settings_object_with_the_configs_names():
    model = tiny_llama()
    cfg = al.PeftConfig(target_modules=["q_proj"], dim=4, alpha=8, dropout=0.1, lora_A_init="gaussian")
    al.apply_lora_to_linear_modules(model, cfg)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.lora_settings == cfg.lora_settings().replace(lora_dtype=torch.float32)  # the resolved dtype
    assert q_proj.lora_dropout.p == 0.1


LEGACY = {"lora_dim": "dim", "lora_alpha": "alpha", "lora_scale": "scale", "lora_use_rslora": "use_rslora",
          "lora_dropout_position": "dropout_position", "lora_A_init_method": "lora_A_init"}


def test_legacy_attribute_names_warn_once_each_and_read_the_settings(monkeypatch):
    import automodel_lora.deprecated as deprecated

    monkeypatch.setattr(deprecated, "LEGACY_WARNED", set())
    model = tiny_llama()
    cfg = al.PeftConfig(target_modules=["q_proj"], dim=4, alpha=8, dropout_position="pre", lora_A_init="gaussian",
                        use_rslora=True)
    al.apply_lora_to_linear_modules(model, cfg)
    q_proj, other = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    expected = {"lora_dim": 4, "lora_alpha": 8, "lora_scale": 4.0, "lora_use_rslora": True,
                "lora_dropout_position": "pre", "lora_A_init_method": "gaussian"}
    for name, field in LEGACY.items():
        assert getattr(q_proj.lora_settings, field) == expected[name]  # the values the aliases must give
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            values = [getattr(q_proj, name), getattr(q_proj, name), getattr(other, name)]
        assert values == [expected[name]] * 3, name
        assert [w.category for w in seen] == [DeprecationWarning], (name, [str(w.message) for w in seen])
        assert str(seen[0].message).startswith(f"{name} is deprecated; read module.lora_settings.{field} instead")
        assert seen[0].filename == __file__  # attributed to the reader's line
        with pytest.raises(AttributeError, match=rf"{name} is read-only.*lora_settings.replace\({field}="):
            setattr(q_proj, name, 1)  # the settings object is the one place
        assert getattr(q_proj.lora_settings, field) == expected[name]


def test_the_package_itself_reads_no_legacy_attribute(monkeypatch, tmp_path):
    """Patch, train a step (both classes), repr, deepcopy, pickle, merge, unmerge, save, load, remove: none of it
    reads a deprecated alias (each would warn here, the once-per-name record being empty)."""
    import automodel_lora.deprecated as deprecated

    monkeypatch.setattr(deprecated, "LEGACY_WARNED", set())
    ids = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"lora_\w+ is deprecated", category=DeprecationWarning)
        for use_triton in (True, False):
            model = tiny_llama()
            cfg = al.PeftConfig(match_all_linear=True, dim=4, alpha=8, dropout=0.1, use_triton=use_triton)
            al.apply_lora_to_linear_modules(model, cfg)
            model(ids, labels=ids).loss.backward()
            repr(model)
            copy.deepcopy(model)
            pickle.loads(pickle.dumps(model))
            al.save_adapter(model, tmp_path / str(use_triton), cfg)
            al.merge_lora(model)
            al.unmerge_lora(model)
            fresh = tiny_llama()
            al.load_adapter(fresh, tmp_path / str(use_triton))
            al.load_adapter(fresh, tmp_path / str(use_triton))  # into the patched model: the scale check
            al.remove_lora(model)
    assert deprecated.LEGACY_WARNED == set()


def test_patch_takes_a_settings_object_and_overrides():
    settings = al.LoraSettings(dim=4, alpha=16)
    layer = al.patch_linear_module(nn.Linear(8, 8), settings, dropout_position="pre")
    assert layer.lora_settings == settings.replace(dropout_position="pre", lora_dtype=torch.float32)
    with pytest.raises(TypeError, match="settings must be a LoraSettings"):
        al.patch_linear_module(nn.Linear(8, 8), 16)  # the rank goes by keyword: dim=16
    with pytest.raises(TypeError, match="'rank'"):
        al.patch_linear_module(nn.Linear(8, 8), rank=16)


def test_lora_A_init_method_keyword_is_deprecated_but_works():
    with pytest.warns(DeprecationWarning, match=r"lora_A_init_method=.*lora_A_init="):
        layer = al.patch_linear_module(nn.Linear(8, 8), lora_A_init_method="kaiming")
    assert layer.lora_settings.lora_A_init == "kaiming"
    with pytest.warns(DeprecationWarning, match="lora_A_init_method"):
        assert al.LinearLoRA(8, 4, lora_A_init_method="gaussian").lora_settings.lora_A_init == "gaussian"


def test_triton_linear_lora_is_a_deprecated_alias_of_fused_linear_lora():
    import automodel_lora.lora as lora_module

    with pytest.warns(DeprecationWarning, match="FusedLinearLoRA"):
        assert al.TritonLinearLoRA is al.FusedLinearLoRA
    with pytest.warns(DeprecationWarning, match="FusedLinearLoRA"):
        assert lora_module.TritonLinearLoRA is al.FusedLinearLoRA


def test_a_pickle_from_before_the_rename_and_the_settings_object_still_loads():
    """Old pickles name the mixin `automodel_lora.lora.TritonLinearLoRA` and keep `lora_dim`, `lora_alpha`, ...
    as separate attributes; they load into `FusedLinearLoRA` with `lora_settings` rebuilt."""
    layer = al.patch_linear_module(nn.Linear(12, 10), dim=4, alpha=8, dropout_position="pre", use_rslora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 12)
    expected = layer(x)
    state = layer.__dict__
    settings = state.pop("lora_settings")
    state.update(lora_dim=4, lora_alpha=8, lora_scale=settings.scale, lora_use_rslora=True,
                 lora_dropout_position="pre", lora_A_init_method="xavier")
    old = pickle.dumps(layer, protocol=2).replace(b"\nFusedLinearLoRA\n", b"\nTritonLinearLoRA\n")
    assert b"TritonLinearLoRA" in old
    with pytest.warns(DeprecationWarning, match="TritonLinearLoRA"):
        loaded = pickle.loads(old)
    assert isinstance(loaded, al.FusedLinearLoRA) and "lora_dim" not in loaded.__dict__
    assert loaded.lora_settings == settings
    assert torch.equal(loaded(x), expected)


def _spy_on_kernel_options(monkeypatch):
    import automodel_lora.lora as lora_module

    seen = []
    real = lora_module.lora_linear

    def spy(*args, options=None, **kwargs):
        seen.append(options)
        return real(*args, options=options, **kwargs)

    monkeypatch.setattr(lora_module, "lora_linear", spy)
    return seen


def test_two_models_in_one_process_run_their_own_kernel_options(monkeypatch):
    seen = _spy_on_kernel_options(monkeypatch)
    cublas, triton = al.KernelOptions(base_gemm="cublas"), al.KernelOptions(base_gemm="triton", fuse_proj=False)
    a, b = ToyModel(), ToyModel()
    al.apply_lora_to_linear_modules(a, al.PeftConfig(target_modules=["fc1"], kernels=cublas))
    al.apply_lora_to_linear_modules(b, al.PeftConfig(target_modules=["fc1"], kernels={"base_gemm": "triton", "fuse_proj": False}))
    ids = torch.randint(0, 16, (2, 3))
    a(ids)
    assert seen and all(o == cublas for o in seen)
    seen.clear()
    b(ids)
    assert seen and all(o == triton for o in seen)


def test_kernel_options_per_module_and_set_on_a_patched_model(monkeypatch):
    seen = _spy_on_kernel_options(monkeypatch)
    own = al.KernelOptions(fast_launch=False)
    layer = al.patch_linear_module(nn.Linear(8, 8), dim=2, kernels=own)
    layer(torch.randn(2, 8))
    assert seen == [own]
    model = ToyModel()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["fc1", "fc2"]))
    assert al.set_kernel_options(model, {"base_gemm": "cublas"}) == 8
    assert {m.lora_settings.kernels.base_gemm for _, m in al.lora_modules(model)} == {"cublas"}
    assert al.set_kernel_options(model.layers[0]["fc1"], own) == 1
    assert model.layers[0]["fc1"].lora_settings.kernels == own and model.layers[0]["fc2"].lora_settings.kernels != own
    with pytest.raises(ValueError, match="no LoRA adapters"):
        al.set_kernel_options(tiny_llama(), own)
