"""Parity with HF PEFT and NeMo AutoModel on what gets adapted: configs written for them work here."""


import json

import pytest
import torch
from torch import nn

import automodel_lora as al
from automodel_lora import ModuleMatcher, PeftConfig, apply_lora_to_linear_modules
from automodel_lora.matcher import output_head_names

from .conftest import assert_close, tiny_llama, tiny_llama_config

peft = pytest.importorskip("peft")


def adapted_names(model) -> list[str]:
    return sorted(name for name, _ in al.lora_modules(model))


def linear_names(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))


# ---- exclude_modules alone ---------------------------------------------------------------------------


def test_exclude_modules_alone_adapts_every_linear_but_the_excluded_and_the_head():
    """NeMo AutoModel's recipes write `exclude_modules: ["*.out_proj"]` with no targets: every other linear."""
    model = tiny_llama()
    n = apply_lora_to_linear_modules(model, PeftConfig(exclude_modules=["*.o_proj", "down_proj"]))
    expected = [name for name in linear_names(model) if name != "lm_head" and not name.endswith(("o_proj", "down_proj"))
                and ".lora_" not in name]
    assert adapted_names(model) == expected and n == len(expected) == 10


def test_exclude_modules_alone_from_a_yaml_style_dict():
    model = tiny_llama()
    apply_lora_to_linear_modules(model, {"exclude_modules": ".*mlp.*"})
    assert all("self_attn" in name for name in adapted_names(model)) and len(adapted_names(model)) == 8


# ---- single strings and None ---------------------------------------------------------------------------


def test_a_single_string_is_one_pattern_and_none_is_no_pattern():
    matcher = ModuleMatcher("q_proj")
    assert matcher.target_modules == ["q_proj"]
    assert matcher.match(nn.Linear(2, 2), "model.layers.0.self_attn.q_proj")
    assert not matcher.match(nn.Linear(2, 2), "q")  # not the characters 'q', '_', 'p', ...
    assert ModuleMatcher(None).target_modules == [] and ModuleMatcher(None, None).exclude_modules == []
    assert ModuleMatcher(exclude_modules="lm_head").exclude_modules == ["lm_head"]
    assert PeftConfig(target_modules=None, match_all_linear=True).target_modules == []
    assert PeftConfig(target_modules="q_proj").target_modules == ["q_proj"]


def test_a_module_name_of_none_is_not_a_crash():
    assert ModuleMatcher(["q_proj"]).match(nn.Linear(2, 2), None) is False
    assert ModuleMatcher(match_all_linear=True).match(nn.Linear(2, 2), None) is True  # the root's name, ""
    with pytest.raises(ValueError, match="target_modules entries must be non-empty strings.*None"):
        ModuleMatcher(["q_proj", None])


# ---- output heads -------------------------------------------------------------------------------------


def _bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, num_labels=3)


def _head_models():
    from transformers import (
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertForTokenClassification,
        LlamaForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    roberta = RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=40, num_labels=3)
    return [
        (LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)), ["score"]),
        (BertForSequenceClassification(_bert_config()), ["classifier"]),
        (BertForTokenClassification(_bert_config()), ["classifier"]),
        (BertForQuestionAnswering(_bert_config()), ["qa_outputs"]),
        (RobertaForSequenceClassification(roberta), ["classifier.dense", "classifier.out_proj"]),
        (tiny_llama(), ["lm_head"]),
    ]


def test_match_all_linear_leaves_out_every_task_head():
    for model, heads in _head_models():
        assert set(heads) <= output_head_names(model)
        apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True))
        adapted = adapted_names(model)
        assert not set(heads) & set(adapted), type(model).__name__
        assert len(adapted) == len([n for n in linear_names(model) if n not in heads and ".lora_" not in n])


def test_a_head_named_in_target_modules_is_adapted():
    from transformers import BertForSequenceClassification, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0))
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=["q_proj", "score"]))
    assert "score" in adapted_names(model)
    model = BertForSequenceClassification(_bert_config())
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=["classifier"]))
    assert adapted_names(model) == ["classifier"]


# ---- typos in target_modules --------------------------------------------------------------------------


def test_a_target_entry_that_matches_nothing_fails_naming_it_and_its_near_misses():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"target_modules entry 'q_prj' matches no linear module of LlamaForCausalLM"
                                         r".*not found in the base model.*did you mean 'q_proj'.*allow_unmatched_targets"):
        apply_lora_to_linear_modules(model, PeftConfig(target_modules=["q_prj", "v_proj"]))
    assert not al.lora_modules(model)
    with pytest.raises(ValueError, match=r"'self_attn\.v_prj'.*did you mean 'self_attn\.v_proj'"):
        apply_lora_to_linear_modules(model, PeftConfig(target_modules=["self_attn.v_prj"]))
    with pytest.raises(ValueError, match=r"'\*\.up_prj'.*did you mean 'up_proj'"):
        apply_lora_to_linear_modules(model, PeftConfig(target_modules=["q_proj", "*.up_prj"]))
    with pytest.raises(ValueError, match=r"'zzz' matches no linear module.*the linear modules are e\.g\."):
        apply_lora_to_linear_modules(model, PeftConfig(target_modules=["zzz"]))


def test_allow_unmatched_targets_lets_a_shared_config_skip_missing_names():
    model = tiny_llama()
    cfg = PeftConfig(target_modules=["q_proj", "c_attn", "query"], allow_unmatched_targets=True)
    assert apply_lora_to_linear_modules(model, cfg) == 2
    with pytest.raises(ValueError, match="matches no linear module"):  # still: nothing at all is an error
        apply_lora_to_linear_modules(tiny_llama(), PeftConfig(target_modules=["c_attn"], allow_unmatched_targets=True))
    with pytest.raises(ValueError, match="allow_unmatched_targets must be true or false"):
        PeftConfig(allow_unmatched_targets="yes")


def test_an_entry_whose_only_modules_are_excluded_is_not_a_typo():
    model = tiny_llama()
    cfg = PeftConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.*.self_attn.v_proj"])
    assert apply_lora_to_linear_modules(model, cfg) == 2


# ---- PEFT's names --------------------------------------------------------------------------------------


def test_peft_names_are_aliases_of_dim_alpha_dropout():
    cfg = PeftConfig(target_modules=["q_proj"], r=16, lora_alpha=8, lora_dropout=0.1)
    assert (cfg.dim, cfg.alpha, cfg.dropout) == (16, 8, 0.1)
    assert cfg == PeftConfig(target_modules=["q_proj"], dim=16, alpha=8, dropout=0.1)
    d = cfg.to_dict()
    assert d["dim"] == 16 and d["alpha"] == 8 and not {"r", "lora_alpha", "lora_dropout"} & set(d)
    assert PeftConfig.from_dict({"r": 16, "lora_alpha": 8}) == PeftConfig(dim=16, alpha=8)
    assert PeftConfig.from_dict(d) == cfg


@pytest.mark.parametrize("ours, theirs", [("dim", "r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")])
def test_both_spellings_of_one_field_is_an_error_naming_both(ours, theirs):
    value = 0.1 if ours == "dropout" else 4
    with pytest.raises(ValueError, match=rf"both {ours} and {theirs}"):
        PeftConfig(**{ours: value, theirs: value})
    with pytest.raises(ValueError, match=rf"both {ours} and {theirs}"):
        PeftConfig.from_dict({ours: value, theirs: value})


def test_peft_names_in_a_yaml_file(tmp_path):
    path = tmp_path / "peft.yaml"
    path.write_text("peft:\n  r: 16\n  lora_alpha: 32\n  target_modules: [q_proj]\n")
    cfg = PeftConfig.from_yaml(str(path))
    assert (cfg.dim, cfg.alpha) == (16, 32)


def test_an_unknown_key_suggests_our_name():
    with pytest.raises(ValueError, match=r"unknown PeftConfig key\(s\) \['rank'\].*did you mean 'rank' -> 'dim'"):
        PeftConfig.from_dict({"rank": 4})
    with pytest.raises(ValueError, match=r"did you mean 'lora_alpah' -> 'lora_alpha'"):
        PeftConfig.from_dict({"lora_alpah": 4})


# ---- layers_to_transform / layers_pattern ------------------------------------------------------------

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize_lora_B(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


@pytest.mark.parametrize("layers, pattern", [([0], "layers"), (1, None), ([0, 1], ["layers"])])
def test_layers_to_transform_selects_layers_by_index(layers, pattern):
    model = tiny_llama()
    cfg = PeftConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=layers, layers_pattern=pattern)
    apply_lora_to_linear_modules(model, cfg)
    wanted = [layers] if isinstance(layers, int) else layers
    assert adapted_names(model) == [f"model.layers.{i}.self_attn.{p}" for i in wanted for p in ("q_proj", "v_proj")]


def test_layers_to_transform_narrows_match_all_linear_and_exclude_only_configs():
    model = tiny_llama()
    apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True, layers_to_transform=[1]))
    assert len(adapted_names(model)) == 7 and all(n.startswith("model.layers.1.") for n in adapted_names(model))
    model = tiny_llama()
    apply_lora_to_linear_modules(model, PeftConfig(exclude_modules=["*mlp*"], layers_to_transform=[0], layers_pattern="layers"))
    assert len(adapted_names(model)) == 4 and all(n.startswith("model.layers.0.self_attn") for n in adapted_names(model))


@pytest.mark.parametrize("changes, words", [
    ({"layers_to_transform": [-1]}, "layers_to_transform must be a layer index"),
    ({"layers_to_transform": "0"}, "layers_to_transform must be a layer index"),
    ({"layers_pattern": "layers"}, "layers_pattern='layers' needs layers_to_transform"),
    ({"layers_to_transform": [0], "layers_pattern": 3}, "layers_pattern must be the name"),
    ({"layers_to_transform": [0], "layers_pattern": "("}, "layers_pattern '\\(' is not a valid regular expression"),
])
def test_bad_layer_selection_is_an_error_naming_the_field(changes, words):
    with pytest.raises(ValueError, match=rf"PeftConfig\.{words}"):
        PeftConfig(**changes)


def test_layers_to_transform_saves_and_peft_loads_it_with_equal_logits(tmp_path):
    cfg = PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8, layers_to_transform=[0], layers_pattern="layers")
    model = randomize_lora_B(tiny_llama())
    apply_lora_to_linear_modules(model, cfg)
    randomize_lora_B(model)
    al.save_adapter(model, tmp_path, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["target_modules"], saved["layers_to_transform"], saved["layers_pattern"]) == (
        ["q_proj", "v_proj"], [0], "layers")
    assert al.PeftConfig.from_dict(json.loads((tmp_path / "automodel_lora_config.json").read_text())) == cfg
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert sorted(n for n, _ in peft_model.named_modules() if n.endswith("lora_A")) == [
        f"base_model.model.model.layers.0.self_attn.{p}.lora_A" for p in ("q_proj", "v_proj")]
    assert_close(logits(peft_model), logits(model), what="logits")


def test_adapter_peft_trained_on_layer_0_loads_here_with_equal_logits(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[0],
                             layers_pattern="layers", task_type="CAUSAL_LM")
    peft_model = randomize_lora_B(peft.get_peft_model(tiny_llama(), config)).eval()
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_llama()
    assert al.load_adapter(model, tmp_path) == 2
    assert adapted_names(model) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert_close(logits(model), logits(peft_model), what="logits")


# ---- rank_pattern / alpha_pattern ----------------------------------------------------------------------


def test_rank_and_alpha_patterns_set_per_module_rank_and_alpha_by_peft_key_rule():
    model = tiny_llama()
    cfg = PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8,
                     rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"q_proj": 16})
    apply_lora_to_linear_modules(model, cfg)
    got = {name: (m.lora_settings.dim, m.lora_settings.alpha) for name, m in al.lora_modules(model)}
    assert got == {
        "model.layers.0.self_attn.q_proj": (4, 16), "model.layers.0.self_attn.v_proj": (2, 8),
        "model.layers.1.self_attn.q_proj": (6, 16), "model.layers.1.self_attn.v_proj": (2, 8),
    }
    assert model.model.layers[1].self_attn.q_proj.lora_A.weight.shape == (6, 32)
    # a key matches the name or a dotted suffix to its end, as PEFT's get_pattern_key: "proj" alone matches nothing
    assert PeftConfig(rank_pattern={"proj": 2}).settings_for("model.layers.0.self_attn.q_proj").dim == 8
    assert PeftConfig(rank_pattern={".*proj": 2}).settings_for("model.layers.0.self_attn.q_proj").dim == 2


@pytest.mark.parametrize("changes, words", [
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]: the value must be a positive integer"),
    ({"rank_pattern": {"q_proj": 2.0}}, r"rank_pattern\['q_proj'\]: the value must be a positive integer"),
    ({"alpha_pattern": {"q_proj": -1}}, r"alpha_pattern\['q_proj'\]: the value must be a positive"),
    ({"rank_pattern": {"(": 2}}, r"rank_pattern key '\(' is not a valid regular expression"),
    ({"alpha_pattern": ["q_proj"]}, r"alpha_pattern must be a mapping of regex -> alpha"),
])
def test_bad_patterns_are_errors_naming_the_field_and_key(changes, words):
    with pytest.raises(ValueError, match=rf"PeftConfig\.{words}"):
        PeftConfig(**changes)


def test_rank_and_alpha_patterns_round_trip_with_peft(tmp_path):
    cfg = PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8, rank_pattern={"v_proj": 2},
                     alpha_pattern={"q_proj": 16})
    model = tiny_llama()
    apply_lora_to_linear_modules(model, cfg)
    randomize_lora_B(model)
    al.save_adapter(model, tmp_path / "ours", cfg)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    assert_close(logits(peft_model), logits(model), what="logits")
    # and back: PEFT saves its own patterns, this library loads them
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    again = tiny_llama()
    assert al.load_adapter(again, tmp_path / "theirs") == 4
    assert {n: (m.lora_settings.dim, m.lora_settings.alpha) for n, m in al.lora_modules(again)} == {
        n: (m.lora_settings.dim, m.lora_settings.alpha) for n, m in al.lora_modules(model)}
    assert_close(logits(again), logits(model), what="logits")
    # PEFT's own config with the same user patterns gives the same adapter shapes
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                             alpha_pattern={"q_proj": 16}, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), config)
    assert {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): tuple(p.shape)
            for n, p in theirs.named_parameters() if "lora_A" in n} == {
        n: tuple(m.lora_A.weight.shape) for n, m in al.lora_modules(model)}
