import pytest
from torch import nn

from automodel_lora import ModuleMatcher, PeftConfig, apply_lora_to_linear_modules, is_lora_module
from automodel_lora.matcher import name_matches

from .conftest import ToyModel, tiny_llama

FQN = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("q_proj", True),
        ("self_attn.q_proj", True),
        (FQN, True),
        ("proj", False),  # a suffix must start at a dot
        ("_proj", False),
        ("k_proj", False),
        ("*_proj", True),
        ("*.layers.[0-3].*", True),
        ("*.layers.[4-7].*", False),
        ("model.layers.?.self_attn.q_proj", True),
        (".*q_proj.*", True),  # NeMo's regex style
        (".*fc.*", False),
        ("model\\.layers\\.0\\..*", True),
    ],
)
def test_name_rules(pattern, expected):
    assert name_matches(pattern, FQN) is expected


def adapted(model):
    return sorted(name for name, m in model.named_modules() if is_lora_module(m))


def test_plain_names_match_suffixes_in_a_real_llama():
    model = tiny_llama()
    assert apply_lora_to_linear_modules(model, PeftConfig(target_modules=["q_proj", "mlp.down_proj"])) == 4
    assert adapted(model) == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.q_proj")]


def test_regex_style_and_glob_patterns():
    model = ToyModel()
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=[".*fc.*"]))
    assert adapted(model) == sorted(f"layers.{i}.fc{j}" for i in range(4) for j in (1, 2))
    model = ToyModel()
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=["layers.[0-1].*"]))
    assert adapted(model) == sorted(f"layers.{i}.{n}" for i in range(2) for n in ("q_proj", "fc1", "fc2"))


def test_exclude_wins_over_target():
    model = ToyModel()
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=["fc1", "fc2"], exclude_modules=["layers.0.*", "fc2"]))
    assert adapted(model) == ["layers.1.fc1", "layers.2.fc1", "layers.3.fc1"]


def test_match_all_linear_skips_the_head_but_naming_it_adapts_it():
    model = tiny_llama()
    n = apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True))
    assert n == 14 and "lm_head" not in adapted(model)
    model = tiny_llama()
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=["lm_head", "q_proj"]))
    assert "lm_head" in adapted(model)


def test_head_found_through_get_output_embeddings_whatever_its_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def get_output_embeddings(self):
            return self.out

    model = Net()
    apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True))
    assert adapted(model) == ["body"]


def test_plain_target_naming_a_non_linear_module_is_an_error():
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        apply_lora_to_linear_modules(model, PeftConfig(target_modules=["mlp"]))
    assert "model.layers.0.mlp" in str(err.value) and "LlamaMLP" in str(err.value)
    assert not adapted(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_glob_patterns_skip_non_linear_modules():
    model = ToyModel()
    assert apply_lora_to_linear_modules(model, PeftConfig(target_modules=["layers.3.*"])) == 3


def test_nothing_matched_lists_existing_linear_names():
    with pytest.raises(ValueError) as err:
        apply_lora_to_linear_modules(tiny_llama(), PeftConfig(target_modules=["query"]))
    msg = str(err.value)
    assert "'query'" in msg and "model.layers.0.self_attn.q_proj" in msg


def test_matcher_direct_use():
    matcher = ModuleMatcher(target_modules=["fc1"], exclude_modules=["layers.2.fc1"])
    model = ToyModel()
    names = [n for n, m in model.named_modules() if matcher.match(m, n)]
    assert names == ["layers.0.fc1", "layers.1.fc1", "layers.3.fc1"]


@pytest.mark.parametrize(
    "pattern, fqn, expected",
    [
        ("model.layers.1.*", "model.layers.1.mlp.up_proj", True),
        ("model.layers.1.*", "model.layers.12.mlp.up_proj", False),  # a glob's '.' is a literal dot
        ("layers.[0-1].*", "layers.10.fc1", False),
        ("*.layers.1.*", "model.layers.11.q_proj", False),
        ("model\\.layers\\.1\\..*", "model.layers.11.q_proj", False),
        ("(q|k)_proj", "k_proj", True),
    ],
)
def test_glob_dots_are_literal_and_regex_is_chosen_by_syntax(pattern, fqn, expected):
    assert name_matches(pattern, fqn) is expected


def test_layer_glob_on_a_twelve_layer_model_selects_one_layer():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(12)])
    n = apply_lora_to_linear_modules(model, PeftConfig(target_modules=["1.*"]))
    assert n == 2 and adapted(model) == ["1.0", "1.1"]


def test_invalid_regex_is_an_error_naming_the_pattern():
    with pytest.raises(ValueError, match=r"'\.\*\(q_proj' reads as a regular expression"):
        name_matches(".*(q_proj", "model.q_proj")
