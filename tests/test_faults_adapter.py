"""Faults and bad input around adapters: merging NaN adapters, and loading broken or mismatched adapter files.

Each test states a guarantee: merge/unmerge/remove never leave a base weight changed after an error, and
`load_adapter` refuses a bad file with an `AdapterFormatError` naming the file and the key, before the model
is touched.
"""

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import automodel_lora as al

from .conftest import tiny_llama

CFG = al.PeftConfig(target_modules=["q_proj", "v_proj"], dim=4, alpha=8)


def adapted(cfg=CFG):
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, cfg)
    with torch.no_grad():
        for _, m in al.lora_modules(model):
            m.lora_B.weight.normal_(std=0.05)
    return model


def base_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def assert_unchanged(model, before):
    after = base_weights(model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


@pytest.fixture
def adapter_dir(tmp_path):
    al.save_adapter(adapted(), tmp_path)
    return tmp_path


def edit_config(path, **changes):
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return config_path


def edit_tensors(path, fn):
    weights_path = path / "adapter_model.safetensors"
    save_file(fn(load_file(weights_path)), weights_path)
    return weights_path


# ---------------------------------------------------------------------------------------------------------
# merge / unmerge / remove
# ---------------------------------------------------------------------------------------------------------


def test_merge_with_a_nan_adapter_raises_naming_the_module_and_changes_no_weight():
    model = adapted()
    last_name, last = al.lora_modules(model)[-1]  # the earlier modules would be written first
    with torch.no_grad():
        last.lora_A.weight[0, 0] = float("nan")
    before = base_weights(model)
    with pytest.raises(ValueError, match=rf"{last_name!r}.*non-finite.*No base weight was changed"):
        al.merge_lora(model)
    assert_unchanged(model, before)
    assert not any(m.lora_merged for _, m in al.lora_modules(model))


def test_merge_that_overflows_the_base_dtype_raises_and_changes_nothing():
    layer = al.patch_linear_module(torch.nn.Linear(8, 8, dtype=torch.float16), dim=2, alpha=2)
    with torch.no_grad():
        layer.lora_A.weight.fill_(200.0)
        layer.lora_B.weight.fill_(200.0)  # 2 * 200 * 200 = 80000 > float16's 65504
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="overflows torch.float16"):
        al.merge_lora(layer)
    assert torch.equal(layer.weight, before) and not layer.lora_merged
    assert al.merge_lora(layer, safe=False) == 1 and torch.isinf(layer.weight).any()  # the check can be skipped


def test_merging_twice_warns_and_does_nothing():
    model = adapted()
    assert al.merge_lora(model) == 4
    merged = base_weights(model)
    with pytest.warns(UserWarning, match="already merged"):
        assert al.merge_lora(model) == 0
    assert_unchanged(model, merged)


def test_unmerging_an_unmerged_model_warns_and_does_nothing():
    model = adapted()
    before = base_weights(model)
    with pytest.warns(UserWarning, match="no adapter of this model is merged"):
        assert al.unmerge_lora(model) == 0
    assert_unchanged(model, before)


@pytest.mark.parametrize("undo", ["unmerge", "remove"])
def test_an_adapter_gone_nan_after_merge_cannot_corrupt_the_base(undo):
    model = adapted()
    al.merge_lora(model)
    merged = base_weights(model)
    name, module = al.lora_modules(model)[1]
    with torch.no_grad():
        module.lora_B.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match=rf"cannot unmerge the adapter of {name!r}"):
        al.unmerge_lora(model) if undo == "unmerge" else al.remove_lora(model)
    assert_unchanged(model, merged)
    assert len(al.lora_modules(model)) == 4 and all(m.lora_merged for _, m in al.lora_modules(model))


def test_remove_of_a_merged_model_gives_the_original_weights_back():
    model = adapted()
    original = base_weights(model)
    al.merge_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remove_lora's own unmerge does not warn
        assert al.remove_lora(model) == 4
    for k, v in base_weights(model).items():
        torch.testing.assert_close(v, original[k])


# ---------------------------------------------------------------------------------------------------------
# load_adapter: tensors
# ---------------------------------------------------------------------------------------------------------


def test_error_type_is_exported_and_a_value_error():
    assert issubclass(al.AdapterFormatError, ValueError)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_an_error_naming_file_and_key(adapter_dir, value):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"

    def poison(tensors):
        tensors[key] = torch.full_like(tensors[key], value)
        return tensors

    weights_path = edit_tensors(adapter_dir, poison)
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=rf"{weights_path}.*{key}.*NaN/Inf"):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)  # nothing was patched


def test_integer_tensors_are_an_error(adapter_dir):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    edit_tensors(adapter_dir, lambda t: {**t, key: t[key].to(torch.int32)})
    with pytest.raises(al.AdapterFormatError, match=rf"{key}.*torch.int32.*floating point"):
        al.load_adapter(tiny_llama(), adapter_dir)


def test_a_file_missing_target_layers_is_an_error_or_with_strict_false_a_warning(adapter_dir):
    edit_tensors(adapter_dir, lambda t: {k: v for k, v in t.items() if "layers.1.self_attn.v_proj" not in k})
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=r"adapter_config.json.*model\.layers\.1\.self_attn\.v_proj"):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)
    with pytest.warns(UserWarning, match=r"model\.layers\.1\.self_attn\.v_proj.*stay unadapted"):
        assert al.load_adapter(model, adapter_dir, strict=False) == 3


def test_a_file_missing_layers_of_a_patched_model_is_an_error(adapter_dir):
    edit_tensors(adapter_dir, lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj" not in k})
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, CFG)
    with pytest.raises(al.AdapterFormatError, match=r"no adapter for 1 adapted module.*model\.layers\.0\.self_attn\.q_proj"):
        al.load_adapter(model, adapter_dir)


def test_tensors_of_another_model_are_refused_before_patching(adapter_dir):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(adapter_dir, lambda t: {**t, key: torch.zeros(4, 48)})
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=r"model\.layers\.0\.self_attn\.q_proj.*another model"):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)


def test_loading_into_a_merged_model_is_refused(adapter_dir):
    model = adapted()
    al.merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora"):
        al.load_adapter(model, adapter_dir)


# ---------------------------------------------------------------------------------------------------------
# load_adapter: adapter_config.json
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "true", 0, 1])
def test_use_rslora_that_is_not_a_json_boolean_is_an_error_naming_file_and_key(adapter_dir, value):
    config_path = edit_config(adapter_dir, use_rslora=value)
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*use_rslora={value!r}.*true or false"):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)


@pytest.mark.parametrize("value", [0, -8, "16", True, None, float("nan")])
def test_lora_alpha_that_is_not_a_positive_number_is_an_error(adapter_dir, value):
    config_path = edit_config(adapter_dir, lora_alpha=value)
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*lora_alpha=.*positive number"):
        al.load_adapter(tiny_llama(), adapter_dir)


def test_missing_lora_alpha_is_an_error_saying_what_to_add(adapter_dir):
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["lora_alpha"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*has no \"lora_alpha\"; add"):
        al.load_adapter(tiny_llama(), adapter_dir)


@pytest.mark.parametrize(
    "text, words",
    [
        pytest.param('{"peft_type": "LORA", "r": 4,', ["not valid JSON", "line 1"], id="truncated"),
        pytest.param("", ["not valid JSON"], id="empty"),
        pytest.param("[1, 2, 3]", ["JSON list, not an object"], id="list"),
        pytest.param('"LORA"', ["JSON str, not an object"], id="string"),
        pytest.param("[" * 100_000 + "]" * 100_000, ["nested too deeply"], id="deep"),
        pytest.param(b"\xff\xfe{}", ["not UTF-8"], id="binary"),
    ],
)
def test_unreadable_adapter_config_is_a_clear_error_naming_the_file(adapter_dir, text, words):
    config_path = adapter_dir / "adapter_config.json"
    config_path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(al.AdapterFormatError) as err:
        al.load_adapter(tiny_llama(), adapter_dir)
    assert str(config_path) in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("key", ["alpha_pattern", "rank_pattern"])
def test_a_bad_pattern_regex_is_an_error_naming_file_key_and_pattern(adapter_dir, key):
    config_path = edit_config(adapter_dir, **{key: {"q_proj(": 4}})
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*{key} key 'q_proj\('.*not a valid regular expression"):
        al.load_adapter(tiny_llama(), adapter_dir)


def test_a_bad_library_config_is_an_error_naming_the_file(tmp_path):
    al.save_adapter(adapted(), tmp_path, CFG)
    library_path = tmp_path / "automodel_lora_config.json"
    library_path.write_text(json.dumps({**CFG.to_dict(), "dim": "four"}))
    with pytest.raises(al.AdapterFormatError, match=rf"{library_path}.*dim"):
        al.load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("value, kept", [([0], 0), (1, 1), ([1], 1)])
def test_tensors_outside_layers_to_transform_are_an_error_naming_the_key(adapter_dir, value, kept):
    """The file's tensors must be the modules PEFT would adapt: layers_to_transform narrows target_modules."""
    config_path = edit_config(adapter_dir, layers_to_transform=value)
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*does not select 'model\.layers\.{1 - kept}\."):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)


@pytest.mark.parametrize("changes, words", [
    ({"layers_to_transform": [-1]}, "layers_to_transform=\\[-1\\] must be a layer index"),
    ({"layers_to_transform": "0"}, "layers_to_transform='0' must be a layer index"),
    ({"layers_to_transform": [True]}, "layers_to_transform=\\[True\\] must be a layer index"),
    ({"layers_to_transform": [0, 1], "layers_pattern": 3}, "layers_pattern=3 must be the name"),
    ({"layers_to_transform": [0, 1], "layers_pattern": "("}, "layers_pattern '\\(' is not a valid regular"),
    ({"layers_pattern": "layers"}, "layers_pattern='layers' needs layers_to_transform"),
    ({"layers_to_transform": [0, 1], "layers_pattern": "layers", "target_modules": ".*q_proj"},
     "cannot narrow a target_modules regex"),
])
def test_bad_layer_selection_keys_are_errors_naming_file_and_key(adapter_dir, changes, words):
    config_path = edit_config(adapter_dir, **changes)
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*{words}"):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)


def test_layer_selection_covering_every_tensor_loads(adapter_dir):
    edit_config(adapter_dir, layers_to_transform=[0, 1], layers_pattern="layers")
    assert al.load_adapter(tiny_llama(), adapter_dir) == 4


@pytest.mark.parametrize("key, value", [("layers_to_transform", None), ("layers_to_transform", []),
                                        ("layers_pattern", None), ("layers_pattern", ""), ("layers_pattern", [])])
def test_absent_layer_selection_keys_load_as_peft_writes_them(adapter_dir, key, value):
    edit_config(adapter_dir, **{key: value})
    assert al.load_adapter(tiny_llama(), adapter_dir) == 4


@pytest.mark.parametrize("value", ["4", 4.0, True, 0, -4, [4]])
def test_r_that_is_not_a_positive_integer_is_an_error_naming_file_and_key(adapter_dir, value):
    config_path = edit_config(adapter_dir, r=value)
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*: r={re.escape(repr(value))} is not allowed.*"
                                                    "positive integer"):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)


@pytest.mark.parametrize("key, value, words", [
    ("rank_pattern", "2", "positive integer"), ("rank_pattern", 2.0, "positive integer"),
    ("rank_pattern", True, "positive integer"), ("rank_pattern", 0, "positive integer"),
    ("alpha_pattern", "16", "positive number"), ("alpha_pattern", True, "positive number"),
    ("alpha_pattern", 0, "positive number"), ("alpha_pattern", -1.5, "positive number"),
])
def test_pattern_values_of_the_wrong_type_are_errors_naming_file_key_and_pattern(adapter_dir, key, value, words):
    config_path = edit_config(adapter_dir, **{key: {"v_proj": value}})
    with pytest.raises(al.AdapterFormatError,
                       match=rf"{config_path}.*{key}\['v_proj'\]={re.escape(repr(value))}.*{words}"):
        al.load_adapter(tiny_llama(), adapter_dir)


@pytest.mark.parametrize("patched", [False, True])
@pytest.mark.parametrize("changes, words", [
    ({"r": 8}, r"r=8 is the rank of 'model\.layers\.0\.self_attn\.q_proj', but .*adapter_model\.safetensors holds "
               r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight of shape \(4, 32\) \(rank 4\)"),
    ({"rank_pattern": {"v_proj": 2}}, r"rank_pattern\['v_proj'\]=2 is the rank of 'model\.layers\.0\.self_attn\.v_proj', "
                                      r"but .*adapter_model\.safetensors holds .*v_proj\.lora_A\.weight.*\(rank 4\)"),
])
def test_a_rank_that_disagrees_with_the_tensors_is_an_error(adapter_dir, changes, words, patched):
    """PEFT would build the module at the config's rank (and scale by alpha over it): a file whose tensors
    have another rank is inconsistent, whether or not the model is patched already."""
    config_path = edit_config(adapter_dir, **changes)
    model = adapted() if patched else tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*{words}"):
        al.load_adapter(model, adapter_dir)
    assert len(al.lora_modules(model)) == (4 if patched else 0)


def test_rank_pattern_that_agrees_with_the_tensors_loads(tmp_path):
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj"], dim=4, alpha=8))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["v_proj"], dim=2, alpha=8))
    al.save_adapter(model, tmp_path)
    edit_config(tmp_path, rank_pattern={"v_proj": 2})  # PEFT's own spelling of what save_adapter wrote
    fresh = tiny_llama()
    assert al.load_adapter(fresh, tmp_path) == 4
    assert fresh.model.layers[1].self_attn.v_proj.lora_settings.dim == 2


# A single-string target_modules is HF PEFT's full-match regex over the module's FQN.
def test_a_target_modules_regex_that_selects_exactly_the_tensors_loads(adapter_dir):
    edit_config(adapter_dir, target_modules=r".*\.(q|v)_proj")
    model = tiny_llama()
    assert al.load_adapter(model, adapter_dir) == 4
    assert sorted(name for name, _ in al.lora_modules(model)) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))


@pytest.mark.parametrize("targets", [r".*\.q_proj", "q_proj|v_proj", r"model\.layers\.0\..*"])
def test_a_target_modules_regex_that_does_not_fully_match_a_tensor_is_an_error(adapter_dir, targets):
    """`q_proj|v_proj` would find both names with re.search, but PEFT full-matches: it selects neither."""
    config_path = edit_config(adapter_dir, target_modules=targets)
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*target_modules={re.escape(repr(targets))} does "
                                                    r"not select 'model\.layers\.[01]\.self_attn\.[qv]_proj'.*PEFT "
                                                    "would not load it"):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)


def test_a_target_modules_regex_that_selects_modules_without_weights_is_an_error(adapter_dir):
    config_path = edit_config(adapter_dir, target_modules=r".*\.(q|k|v)_proj")
    model = tiny_llama()
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*selects 2 linear module.*"
                                                    r"model\.layers\.0\.self_attn\.k_proj"):
        al.load_adapter(model, adapter_dir)
    assert not al.lora_modules(model)


@pytest.mark.parametrize("exclude", [["layers.1.self_attn.v_proj"], r"model\.layers\.1\.self_attn\.v_proj"])
def test_tensors_of_an_excluded_module_are_an_error(adapter_dir, exclude):
    config_path = edit_config(adapter_dir, exclude_modules=exclude)
    with pytest.raises(al.AdapterFormatError, match=rf"{config_path}.*exclude_modules=.*does not select "
                                                    r"'model\.layers\.1\.self_attn\.v_proj'"):
        al.load_adapter(tiny_llama(), adapter_dir)
