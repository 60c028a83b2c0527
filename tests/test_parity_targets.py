"""Parity with HF PEFT and NeMo AutoModel on what gets adapted: configs written for them work here."""


import pytest
from torch import nn

import automodel_lora as al
from automodel_lora import ModuleMatcher, PeftConfig, apply_lora_to_linear_modules
from automodel_lora.matcher import output_head_names

from .conftest import tiny_llama, tiny_llama_config


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
