"""LoRA on MoE experts (transformers' fused expert weights): the math against a float64 loop over experts,
routing edge cases, gradients, merge / unmerge / remove, selection errors, and HF PEFT's
`target_parameters` format both ways with real `peft` on tiny Qwen3-MoE and Mixtral models.

Tolerances: the adapted experts compute in float32 against a float64 reference of the same weights; the
outputs are sums of ~hidden products of O(1) terms, so a few float32 roundings of the largest
intermediate: 1e-5 relative to the output's scale. A wrong expert, scale or layout is off by O(1).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import automodel_lora as al
from automodel_lora.experts_lora import ExpertsLoRA, patch_experts_module
from automodel_lora.grouped_mm import group_offsets, grouped_mm

F32_RTOL = 1e-5


def _qwen3_moe(experts=5, top_k=2, layers=2, seed=0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, num_experts=experts,
                         num_experts_per_tok=top_k, head_dim=8)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(cfg).eval()


def _mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, head_dim=8)
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


def _randomize(model, std=0.3):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, std)


def _reference_experts(module, x, top_k_index, top_k_weights):
    """float64 loop over tokens and their experts: W_e + s B_e A_e, then the class's gate and down product."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    weights = {}
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(module, name).double()  # (E, out, in)
        if name in module.lora_A:
            s = module.lora_settings[name].scale
            w = w + s * torch.bmm(module.lora_B[name].double(), module.lora_A[name].double())
        weights[name] = w
    for t in range(x.shape[0]):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            gate, up = (weights["gate_up_proj"][e] @ x[t].double()).chunk(2)
            h = torch.nn.functional.silu(gate) * up
            out[t] += top_k_weights[t, j].double() * (weights["down_proj"][e] @ h)
    return out


@pytest.mark.parametrize("experts, top_k, rank", [(5, 2, 4), (7, 3, 1), (3, 1, 16), (3, 2, 128)])
def test_adapted_experts_equal_a_float64_loop_over_experts(experts, top_k, rank):
    model = _qwen3_moe(experts, top_k)
    module = model.model.layers[0].mlp.experts
    patch_experts_module(module, ["gate_up_proj", "down_proj"], al.LoraSettings(dim=rank, alpha=2 * rank))
    _randomize(model)
    torch.manual_seed(1)
    x = torch.randn(11, 32)
    top_k_index = torch.randint(0, experts, (11, top_k))
    top_k_index[:, 0] = 0  # expert 0 crowded; with 11 tokens some experts stay empty
    top_k_weights = torch.rand(11, top_k)
    got = module(x, top_k_index, top_k_weights)
    want = _reference_experts(module, x, top_k_index, top_k_weights)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=F32_RTOL * want.abs().max().item())


def test_every_token_on_one_expert_and_the_others_empty():
    model = _qwen3_moe(4, 1)
    module = model.model.layers[0].mlp.experts
    patch_experts_module(module, ["down_proj"], al.LoraSettings(dim=3, alpha=6))
    _randomize(model)
    x = torch.randn(6, 32)
    idx, w = torch.full((6, 1), 2), torch.ones(6, 1)
    want = _reference_experts(module, x, idx, w)
    torch.testing.assert_close(module(x, idx, w).double(), want, rtol=0, atol=F32_RTOL * want.abs().max().item())


def test_gradients_of_the_expert_adapters_match_float64_autograd():
    model = _qwen3_moe(4, 2).double()
    module = model.model.layers[0].mlp.experts
    patch_experts_module(module, ["gate_up_proj", "down_proj"], al.LoraSettings(dim=2, alpha=4))
    _randomize(model)
    x = torch.randn(9, 32, dtype=torch.float64, requires_grad=True)
    idx, w = torch.randint(0, 4, (9, 2)), torch.rand(9, 2, dtype=torch.float64)
    params = [x, *module.lora_A.values(), *module.lora_B.values()]
    torch.autograd.gradcheck(lambda *_: module(x, idx, w).sum(), params[:1], eps=1e-6, atol=1e-6)
    got = torch.autograd.grad(module(x, idx, w).square().sum(), params)
    want = torch.autograd.grad(_reference_experts(module, x, idx, w).square().sum(), params)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_apply_merge_unmerge_remove_through_the_model():
    model = _qwen3_moe()
    base = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 9))
    n = al.apply_lora_to_linear_modules(model, al.PeftConfig(target_parameters=["mlp.experts.gate_up_proj"], dim=4))
    assert n == 2 and isinstance(model.model.layers[1].mlp.experts, ExpertsLoRA)
    trainable = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert trainable == [f"model.layers.{i}.mlp.experts.lora_{ab}.gate_up_proj" for i in (0, 1) for ab in "AB"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(model.named_parameters())  # the base FQN stays
    torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)  # B = 0 at init
    _randomize(model)
    adapted = model(input_ids=ids).logits
    assert (adapted - base(input_ids=ids).logits).abs().max() > 1e-2
    assert al.merge_lora(model) == 2
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    al.unmerge_lora(model)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)
    al.remove_lora(model)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    torch.testing.assert_close(model.state_dict(), base.state_dict(), rtol=1e-6, atol=1e-6)


def test_match_all_experts_and_selection_errors_name_the_entry():
    model = _qwen3_moe()
    with pytest.raises(ValueError, match="'mlp.experts.gate_proj' selects no parameter.*gate_up_proj"):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_parameters=["mlp.experts.gate_proj"]))
    with pytest.raises(ValueError, match="selects model.layers.0.mlp.gate.weight.*not a fused expert weight"):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_parameters=["model.layers.0.mlp.gate.weight"]))
    with pytest.raises(ValueError, match="dropout with LoRA on expert weights"):
        al.PeftConfig(match_all_experts=True, dropout=0.1)
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing was touched
    assert al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_experts=True)) == 4


def test_grouped_mm_loop_equals_per_group_products_and_checks_shapes():
    x, w = torch.randn(7, 5), torch.randn(3, 5, 4)
    offsets = group_offsets(torch.tensor([0, 0, 2, 2, 2, 2, 2]), 3)
    assert offsets.tolist() == [2, 2, 7]
    torch.testing.assert_close(grouped_mm(x, w, offsets), torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))
    with pytest.raises(ValueError, match="do not chain"):
        grouped_mm(x, torch.randn(3, 4, 4), offsets)


# ---------------------------------------------------------------- HF PEFT interop
@pytest.mark.parametrize("build, targets", [
    (_qwen3_moe, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    (_qwen3_moe, ["mlp.experts.down_proj"]),
    (_mixtral, ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
])
def test_peft_loads_ours_and_we_load_peft_outputs_equal(tmp_path, build, targets):
    peft = pytest.importorskip("peft")
    base = build()
    ids = torch.randint(0, 64, (2, 9))
    ours = copy.deepcopy(base)
    al.apply_lora_to_linear_modules(ours, al.PeftConfig(target_modules=["q_proj"], target_parameters=targets,
                                                        dim=4, alpha=8))
    _randomize(ours)
    al.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["target_parameters"] == sorted(targets)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    made = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["k_proj"],
                                                                    target_parameters=targets))
    _randomize(made)
    made.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    assert al.load_adapter(loaded, tmp_path / "peft") == 2 + 2 * len(targets)
    torch.testing.assert_close(loaded(input_ids=ids).logits, made(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_expert_adapters_alone_round_trip_and_a_file_missing_one_is_an_error(tmp_path):
    base = _qwen3_moe()
    ours = copy.deepcopy(base)
    al.apply_lora_to_linear_modules(ours, al.PeftConfig(match_all_experts=True, dim=2, alpha=4))
    _randomize(ours)
    al.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [] and cfg["target_parameters"] == ["mlp.experts.down_proj",
                                                                        "mlp.experts.gate_up_proj"]
    loaded = copy.deepcopy(base)
    assert al.load_adapter(loaded, tmp_path / "a") == 4
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="selects model.layers.1.mlp.experts.gate_up_proj, but the file has no adapter"):
        al.load_adapter(copy.deepcopy(base), tmp_path / "a")


def test_a_moe_recipe_trains_the_experts_and_peft_loads_its_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from .recipe_helpers import run_recipe, step_losses, tiny_raw_recipe

    moe = {"model_type": "qwen3_moe", "vocab_size": 259, "hidden_size": 32, "intermediate_size": 64,
           "moe_intermediate_size": 24, "num_experts": 5, "num_experts_per_tok": 2, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    raw = tiny_raw_recipe(tmp_path, train={"max_steps": 8, "lr": 3e-2})
    raw["model"]["tiny"] = moe
    raw["peft"] = {"target_modules": ["q_proj"], "match_all_experts": True, "dim": 4, "alpha": 8}
    summary, _ = run_recipe(raw)
    losses = step_losses(tmp_path / "out")
    assert losses[8] < losses[1]
    out = tmp_path / "out"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    ids = torch.randint(0, 259, (2, 16))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base_model"), out / "adapter")
    ours = AutoModelForCausalLM.from_pretrained(out / "base_model")
    assert al.load_adapter(ours, out / "adapter") == 2 + 4
    assert any(p.abs().max() > 0 for n, p in ours.named_parameters() if "experts.lora_B" in n)  # the experts trained
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_and_save_writes_merged_experts_that_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _qwen3_moe()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj"], match_all_experts=True))
    _randomize(model)
    ids = torch.randint(0, 64, (2, 9))
    want = model(input_ids=ids).logits
    assert al.merge_and_save(model, tmp_path / "merged") == 2 + 2
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(input_ids=ids).logits, want)  # the model stays adapted, unmerged


@pytest.mark.parametrize("use_triton", [False, True])
def test_grouped_lora_linear_by_offsets_or_unsorted_group_ids_equals_a_loop(use_triton):
    """A user's own MoE (seed d9d's GroupedLinear shape): the same result from offsets over grouped rows and
    from per-row group ids in any order, against a float64 loop; gradients of every input."""
    g = torch.Generator().manual_seed(3)
    G, S, fan_in, fan_out, r = 4, 23, 12, 9, 3
    W, b = torch.randn(G, fan_out, fan_in, generator=g), torch.randn(G, fan_out, generator=g)
    A = torch.randn(G, r, fan_in, generator=g).requires_grad_()
    B = torch.randn(G, fan_out, r, generator=g).requires_grad_()
    x = torch.randn(S, fan_in, generator=g).requires_grad_()
    ids = torch.randint(0, G, (S,), generator=g)
    ids[ids == 1] = 2  # group 1 empty
    want = torch.stack([x[s].double() @ (W[i].double() + 0.5 * B[i].double() @ A[i].double()).T + b[i].double()
                        for s, i in enumerate(ids.tolist())])
    got = al.grouped_lora_linear(x, W, A, B, 0.5, group_ids=ids, bias=b, use_triton=use_triton)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=F32_RTOL * want.abs().max().item())
    order = torch.sort(ids, stable=True)[1]
    counts = torch.bincount(ids, minlength=G)
    by_offsets = al.grouped_lora_linear(x[order], W, A, B, 0.5, offsets=torch.cumsum(counts, 0), bias=b,
                                        use_triton=use_triton)
    torch.testing.assert_close(by_offsets, got[order])
    got.square().sum().backward()
    grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    want.square().sum().backward()  # float64 graph through x, A, B (cast per row above)
    for mine, ref in zip(grads, (x.grad, A.grad, B.grad), strict=True):
        torch.testing.assert_close(mine.double(), ref.double(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not both or neither"):
        al.grouped_lora_linear(x, W, A, B, 0.5)
    with pytest.raises(ValueError, match="do not chain"):
        al.grouped_lora_linear(x, W, B, A, 0.5, group_ids=ids)
    with pytest.raises(ValueError, match=r"group id 4 is outside \[0, 4\)"):
        al.grouped_lora_linear(x, W, A, B, 0.5, group_ids=torch.where(ids == 3, 4, ids))


def test_a_refused_expert_apply_changes_nothing():
    model = _qwen3_moe()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_parameters=["mlp.experts.down_proj"], dim=4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match="experts have an adapter already"):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj"],
                                                             target_parameters=["mlp.experts.gate_up_proj"]))
    assert not al.lora_modules(model) and model.state_dict().keys() == state.keys()
    assert flags == {k: p.requires_grad for k, p in model.named_parameters()}
    other = _qwen3_moe()
    other.model.layers[1].mlp.experts._is_expert_parallel = True
    with pytest.raises(ValueError, match="layers.1.mlp.experts' runs under expert parallelism"):
        al.apply_lora_to_linear_modules(other, al.PeftConfig(target_modules=["q_proj"], match_all_experts=True))
    assert not al.lora_modules(other) and type(other.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    assert all(p.requires_grad for p in other.parameters())


def test_loading_into_merged_expert_adapters_is_refused_and_changes_nothing(tmp_path):
    model = _qwen3_moe()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_experts=True, dim=2, alpha=4))
    _randomize(model)
    al.save_adapter(model, tmp_path / "a")
    al.merge_lora(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="expert adapters are merged"):
        al.load_adapter(model, tmp_path / "a")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
