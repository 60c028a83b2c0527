"""Several named adapters in one model: add, switch, disable, delete, combine, save and load (with real `peft`)."""

import copy
import os

import pytest
import torch

import automodel_lora as al

from .conftest import assert_close, tiny_llama

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])
QV = al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8)
MLP = al.PeftConfig(target_modules=["gate_proj", "down_proj"], dim=2, alpha=3)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize(model, name=None, seed=0):
    """Nonzero lora_B (and fresh lora_A) for adapter `name` on every module that has it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, holder in al.adapter_slots.adapter_holders(model, name)[1]:
            for p in (holder.lora_A.weight, holder.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def randomize_every_adapter(model, seed):
    """Nonzero lora_A / lora_B weights and biases for every adapter of every module, in place or not (the module
    itself holds the one in place: only its adapter parts are touched, never its base weight)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in al.lora_modules(model):
            for holder in al.adapter_slots.holders(module).values():
                for p in (*holder.lora_A.parameters(), *holder.lora_B.parameters()):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def single(cfg, seed):
    """A model with one adapter from `cfg`, randomized with `seed`: the reference for that adapter."""
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, cfg)
    randomize(model, seed=seed)
    return model


def two_adapters():
    """'default' on q/v (in use) and 'mlp' on gate/down beside it, each as `single(QV, 0)` / `single(MLP, 1)`."""
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, QV)
    randomize(model, "default", seed=0)
    al.apply_lora_to_linear_modules(model, MLP, adapter_name="mlp")
    randomize(model, "mlp", seed=1)
    return model


def test_a_second_adapter_is_added_beside_the_first_without_changing_its_keys_or_outputs():
    model = two_adapters()
    assert al.adapter_names(model) == ["default", "mlp"] and al.active_adapter(model) == "default"
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    # gate/down got patched for 'mlp' only: its tensors sit in place, switched off
    assert "model.layers.0.mlp.gate_proj.lora_A.weight" in keys
    assert_close(logits(model), logits(single(QV, 0)), what="logits with 'default' in use")
    assert sorted(al.lora_state_dict(model)) == sorted(al.lora_state_dict(single(QV, 0)))
    assert sorted(al.lora_state_dict(model, "mlp")) == sorted(al.lora_state_dict(single(MLP, 1)))


def test_set_adapter_switches_outputs_trainable_flags_and_keeps_parameter_identity():
    model = two_adapters()
    params_before = {id(p) for p in model.parameters()}
    al.set_adapter(model, "mlp")
    assert al.active_adapter(model) == "mlp"
    assert {id(p) for p in model.parameters()} == params_before  # moved, not copied: an optimizer keeps its state
    assert_close(logits(model), logits(single(MLP, 1)), what="logits with 'mlp' in use")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("gate_proj.lora_" in n or "down_proj.lora_" in n) and "inactive" not in n for n in trainable)
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "q_proj" in n)
    al.set_adapter(model, "default")
    assert_close(logits(model), logits(single(QV, 0)), what="logits back on 'default'")


def test_two_adapters_on_the_same_modules_live_under_lora_inactive():
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, QV)
    randomize(model, seed=0)
    al.apply_lora_to_linear_modules(model, QV, adapter_name="other")
    randomize(model, "other", seed=5)
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.lora_inactive.other.lora_B.weight" in keys
    ref_other = single(QV, 5)
    al.set_adapter(model, "other")
    assert "model.layers.0.self_attn.q_proj.lora_inactive.default.lora_B.weight" in set(model.state_dict())
    assert_close(logits(model), logits(ref_other), what="logits of 'other'")
    clone = copy.deepcopy(model)
    assert_close(logits(clone), logits(ref_other), what="deep copy")


def test_disable_adapter_gives_the_base_model_and_restores_after_an_exception():
    model = two_adapters()
    with_adapter = logits(model)
    with al.disable_adapter(model):
        assert_close(logits(model), logits(tiny_llama()), what="base logits")
        assert al.active_adapter(model) is None
    assert_close(logits(model), with_adapter)
    with pytest.raises(RuntimeError, match="boom"), al.disable_adapter(model):
        raise RuntimeError("boom")
    assert_close(logits(model), with_adapter, what="after an exception")
    assert all("lora_enabled" not in m.__dict__ for _, m in al.lora_modules(model) if m.lora_adapter_name == "default")


def test_delete_adapter_in_use_switches_to_the_next_and_the_last_one_restores_the_base_class():
    model = two_adapters()
    al.delete_adapter(model, "default")
    assert al.adapter_names(model) == ["mlp"] and al.active_adapter(model) == "mlp"
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert_close(logits(model), logits(single(MLP, 1)))
    al.delete_adapter(model, "mlp")
    assert al.lora_modules(model) == [] and not any("lora" in k for k in model.state_dict())
    assert_close(logits(model), logits(tiny_llama()))


def test_merge_applies_the_adapter_in_use_only():
    model = two_adapters()
    al.set_adapter(model, "mlp")
    expected = logits(model)
    al.merge_lora(model)
    assert_close(logits(model), expected, what="merged 'mlp'")
    with pytest.raises(ValueError, match="unmerge_lora"):
        al.set_adapter(model, "default")
    al.unmerge_lora(model)
    al.remove_lora(model, merge=True)
    assert_close(logits(model), expected, what="remove_lora(merge=True) keeps the adapter in use")


def test_saving_several_adapters_uses_peft_layout_and_peft_loads_each(tmp_path):
    model = two_adapters()
    al.save_adapter(model, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "mlp"} <= set(os.listdir(tmp_path))
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    peft_model.load_adapter(str(tmp_path / "mlp"), adapter_name="mlp")
    assert_close(logits(peft_model), logits(model), what="PEFT 'default'")
    peft_model.set_adapter("mlp")
    al.set_adapter(model, "mlp")
    assert_close(logits(peft_model), logits(model), what="PEFT 'mlp'")
    al.save_adapter(model, tmp_path / "only", adapter_name="default")  # one named adapter, at the root
    fresh = tiny_llama()
    al.load_adapter(fresh, tmp_path / "only")
    assert_close(logits(fresh), logits(single(QV, 0)))


def test_peft_multi_adapter_directory_loads_here_by_name(tmp_path):
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("mlp", peft.LoraConfig(r=2, lora_alpha=3, target_modules=["gate_proj", "down_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    peft_model.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "mlp" / "adapter_config.json")
    model = tiny_llama()
    al.load_adapter(model, tmp_path)
    al.load_adapter(model, tmp_path, adapter_name="mlp")
    assert al.adapter_names(model) == ["default", "mlp"] and al.active_adapter(model) == "default"
    peft_model.eval()
    assert_close(logits(model), logits(peft_model), what="'default'")
    peft_model.set_adapter("mlp")
    al.set_adapter(model, "mlp")
    assert_close(logits(model), logits(peft_model), what="'mlp'")
    with pytest.raises(FileNotFoundError, match=r"named adapters \['mlp'\].*adapter_name="):
        al.load_adapter(tiny_llama(), _only_named(tmp_path))


def _only_named(tmp_path):
    """A copy of the multi-adapter directory without its root adapter: only `mlp/` is left."""
    import shutil

    out = tmp_path.parent / (tmp_path.name + "_named_only")
    shutil.copytree(tmp_path / "mlp", out / "mlp")
    return out


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_add_weighted_adapter_matches_peft(combination_type):
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "o_proj"], dim=4, alpha=4),
                                    adapter_name="b")
    with torch.no_grad():  # copy PEFT's values in: both models hold the same two adapters
        for fqn, module in al.lora_modules(model):
            for name, holder in al.adapter_slots.holders(module).items():
                peft_layer = peft_model.base_model.model.get_submodule(fqn)
                holder.lora_A.weight.copy_(peft_layer.lora_A[name].weight)
                holder.lora_B.weight.copy_(peft_layer.lora_B[name].weight)
    peft_model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination_type)
    al.add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "mix", combination_type=combination_type)
    peft_model.set_adapter("mix")
    al.set_adapter(model, "mix")
    peft_model.eval()
    assert_close(logits(model), logits(peft_model), what=f"{combination_type} mix")
    if combination_type == "cat":  # exact: the weighted sum of the two updates
        q = model.model.layers[0].self_attn.q_proj
        delta = {n: (h.lora_B.weight @ h.lora_A.weight) * h.lora_settings.scale
                 for n, h in al.adapter_slots.holders(q).items()}
        assert_close(delta["mix"], 0.7 * delta["default"] - 0.4 * delta["b"], what="cat update")


def test_named_adapter_errors_name_the_value_and_the_fix():
    model = two_adapters()
    with pytest.raises(ValueError, match=r"'nope'.*\['default', 'mlp'\]"):
        al.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="adapter_name='a.b'"):
        al.apply_lora_to_linear_modules(model, QV, adapter_name="a.b")
    with pytest.raises(ValueError, match="already has a LoRA adapter named 'mlp'"):
        al.apply_lora_to_linear_modules(model, MLP, adapter_name="mlp")
    with pytest.raises(ValueError, match="same r|one rank"):
        al.add_weighted_adapter(model, ["default", "mlp"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="one weight per adapter"):
        al.add_weighted_adapter(model, ["default", "mlp"], [1.0], "mix", combination_type="cat")
    with pytest.raises(ValueError, match="peft_config describes one adapter"):
        al.save_adapter(model, "/nonexistent", QV)
    with pytest.raises(ValueError, match="modules_to_save"):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["k_proj"], modules_to_save=["lm_head"]),
                                        adapter_name="third")


def test_load_adapter_by_name_adds_beside_and_reloads_into_the_named_adapter(tmp_path):
    source = single(MLP, 1)
    al.save_adapter(source, tmp_path)
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, QV)
    randomize(model, seed=0)
    al.load_adapter(model, tmp_path, adapter_name="mlp")
    assert al.active_adapter(model) == "default"
    assert all(not p.requires_grad for n, p in model.named_parameters() if "gate_proj.lora_" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if "q_proj.lora_" in n)  # the first still trains
    al.set_adapter(model, "mlp")
    assert_close(logits(model), logits(source))
    al.set_adapter(model, "default")
    al.load_adapter(model, tmp_path, adapter_name="mlp")  # into the named (inactive) adapter again
    al.set_adapter(model, "mlp")
    assert_close(logits(model), logits(source))


def test_lora_bias_adapters_switch_save_and_combine_exactly(tmp_path):
    biased = al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8, lora_bias=True)
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, biased)
    al.apply_lora_to_linear_modules(model, biased, adapter_name="two")
    randomize_every_adapter(model, seed=11)
    al.save_adapter(model, tmp_path)
    al.set_adapter(model, "two")
    expected = logits(model)
    fresh = tiny_llama()
    al.load_adapter(fresh, tmp_path / "two")
    assert_close(logits(fresh), expected, what="'two' reloaded with its lora_B biases")
    al.add_weighted_adapter(model, ["default", "two"], [0.5, 2.0], "mix", combination_type="cat")
    q = model.model.layers[1].self_attn.q_proj
    hs = al.adapter_slots.holders(q)
    x = torch.randn(3, 32)
    def delta(h):
        return h.lora_B(h.lora_A(x)) * h.lora_settings.scale
    with torch.no_grad():
        assert_close(delta(hs["mix"]), 0.5 * delta(hs["default"]) + 2.0 * delta(hs["two"]), what="cat with biases")


def test_switching_or_adding_inside_disable_adapter_is_refused_and_leaves_the_model_as_it_was():
    model = two_adapters()
    expected = logits(model)
    with al.disable_adapter(model):
        for call in (lambda: al.set_adapter(model, "mlp"), lambda: al.delete_adapter(model, "default"),
                     lambda: al.apply_lora_to_linear_modules(model, QV, adapter_name="x")):
            with pytest.raises(ValueError, match="inside `with disable_adapter"):
                call()
    assert al.adapter_names(model) == ["default", "mlp"] and al.active_adapter(model) == "default"
    assert_close(logits(model), expected, what="after the block")


def test_only_the_adapter_in_use_is_trainable_after_any_sequence_of_switches():
    model = two_adapters()
    al.apply_lora_to_linear_modules(model, QV, adapter_name="third")
    for name in ("mlp", "third", "default", "mlp"):
        al.set_adapter(model, name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {f"{fqn}.{part}.weight" for fqn, _ in al.adapter_slots.adapter_holders(model, name)[1]
                    for part in ("lora_A", "lora_B")}
        assert trainable == expected, name


def test_loading_a_second_adapter_onto_an_embedding_is_refused_before_anything_changes(tmp_path):
    source = tiny_llama()
    al.apply_lora_to_linear_modules(source, al.PeftConfig(target_modules=["embed_tokens", "q_proj"], dim=4, alpha=8))
    al.save_adapter(source, tmp_path)
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["embed_tokens", "q_proj"], dim=4, alpha=8))
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="second adapter on the embedding"):
        al.load_adapter(model, tmp_path, adapter_name="second")
    assert al.adapter_names(model) == ["default"] and set(model.state_dict()) == keys


def test_a_weighted_mix_of_biased_and_plain_adapters_has_one_lora_bias_flag_and_round_trips(tmp_path):
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8,
                                                         lora_bias=True))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "k_proj"], dim=2, alpha=2),
                                    adapter_name="fr")
    randomize_every_adapter(model, seed=3)
    al.add_weighted_adapter(model, ["default", "fr"], [0.5, 1.5], "mix", combination_type="cat")
    al.save_adapter(model, tmp_path, adapter_name="mix")
    al.set_adapter(model, "mix")
    fresh = tiny_llama()
    al.load_adapter(fresh, tmp_path)
    assert_close(logits(fresh), logits(model), what="the mix reloaded")
