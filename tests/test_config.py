import dataclasses

import pytest
import torch

from automodel_lora import KernelOptions, LoraSettings, PeftConfig


def test_defaults_match_the_documented_ones():
    cfg = PeftConfig(target_modules=["q_proj"])
    assert (cfg.dim, cfg.alpha, cfg.dropout, cfg.dropout_position, cfg.lora_A_init) == (8, 32, 0.0, "post", "xavier")
    assert cfg.lora_dtype is None and cfg.use_triton is True and cfg.use_rslora is False
    assert cfg.exclude_modules == [] and cfg.match_all_linear is False
    assert cfg.scale == 4.0


def test_rslora_scale():
    assert PeftConfig(match_all_linear=True, dim=16, alpha=8, use_rslora=True).scale == pytest.approx(2.0)


def test_dict_round_trip_with_dtype_as_string():
    cfg = PeftConfig(
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["*.0.*"],
        dim=16,
        alpha=8,
        dropout=0.1,
        dropout_position="pre",
        lora_A_init="gaussian",
        lora_dtype=torch.float32,
        use_rslora=True,
    )
    d = cfg.to_dict()
    assert d["lora_dtype"] == "float32"
    assert PeftConfig.from_dict(d) == cfg


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("torch.float16", torch.float16), ("float32", torch.float32)])
def test_dtype_strings(name, dtype):
    assert PeftConfig(match_all_linear=True, lora_dtype=name).lora_dtype is dtype


def test_from_yaml_plain_and_recipe_section(tmp_path):
    plain = tmp_path / "peft.yaml"
    plain.write_text("target_modules: [q_proj]\ndim: 4\nlora_dtype: bf16\n")
    assert PeftConfig.from_yaml(plain) == PeftConfig(target_modules=["q_proj"], dim=4, lora_dtype=torch.bfloat16)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {}\npeft:\n  match_all_linear: true\n  alpha: 16\n")
    assert PeftConfig.from_yaml(recipe) == PeftConfig(match_all_linear=True, alpha=16)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dim=0), ["dim", "0", "positive"]),
        (dict(dim=-3), ["dim", "-3"]),
        (dict(dim=2.5), ["dim", "2.5"]),
        (dict(dropout=1.0), ["dropout", "1.0", "[0, 1)"]),
        (dict(dropout=-0.1), ["dropout", "-0.1"]),
        (dict(dropout_position="middle"), ["dropout_position", "'middle'", "pre", "post"]),
        (dict(lora_A_init="uniform"), ["lora_A_init", "'uniform'", "xavier", "kaiming", "gaussian"]),
        (dict(lora_dtype="float8"), ["lora_dtype", "'float8'", "bfloat16"]),
        (dict(match_all_linear=True, target_modules=["q_proj"]), ["match_all_linear", "target_modules", "q_proj"]),
        (dict(target_modules=[""]), ["target_modules"]),
        (dict(exclude_modules=[".*(q_proj"]), ["exclude_modules", "'.*(q_proj'", "regular expression", "glob"]),
    ],
)
def test_bad_values_name_field_value_and_fix(kwargs, words):
    kwargs = {"target_modules": ["q_proj"], **kwargs} if "match_all_linear" not in kwargs else kwargs
    with pytest.raises(ValueError) as err:
        PeftConfig(**kwargs)
    for word in words:
        assert word in str(err.value)


def test_unknown_key_in_from_dict_lists_valid_keys():
    with pytest.raises(ValueError) as err:
        PeftConfig.from_dict({"target_modules": ["q_proj"], "rank": 8})
    assert "'rank'" in str(err.value) and "dim" in str(err.value) and "target_modules" in str(err.value)


@pytest.mark.parametrize("value", [torch.int8, torch.float64])
def test_lora_dtype_objects_outside_the_training_dtypes_are_refused(value):
    with pytest.raises(ValueError, match=r"lora_dtype=torch\.(int8|float64) is not a dtype adapters train in"):
        PeftConfig(lora_dtype=value)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_a_non_list_of_names_is_a_value_error_naming_the_field(field):
    with pytest.raises(ValueError, match=rf"PeftConfig\.{field} must be a list of module names.*got 5 \(int\)"):
        PeftConfig(**{field: 5})


# ---------------------------------------------------------------------------------------------------------
# LoraSettings (one adapter's settings) and PeftConfig.kernels
# ---------------------------------------------------------------------------------------------------------


def test_lora_settings_defaults_are_peft_configs_and_frozen():
    settings = LoraSettings()
    cfg = PeftConfig(match_all_linear=True)
    assert cfg.lora_settings() == settings and settings.scale == cfg.scale == 4.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.dim = 16
    assert settings.replace(dim=16).scale == 2.0 and settings.replace(use_rslora=True).scale == pytest.approx(32 / 8**0.5)


def test_lora_settings_normalises_dtype_and_kernels():
    settings = LoraSettings(lora_dtype="bf16", kernels={"base_gemm": "cublas"})
    assert settings.lora_dtype is torch.bfloat16
    assert settings.kernels == KernelOptions(base_gemm="cublas")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(dim=0), ["LoraSettings.dim", "positive integer"]),
        (dict(alpha=0), ["LoraSettings.alpha", "positive"]),
        (dict(alpha=-2.0), ["LoraSettings.alpha", "-2.0"]),
        (dict(alpha=float("inf")), ["LoraSettings.alpha", "inf"]),
        (dict(use_rslora="false"), ["LoraSettings.use_rslora", "'false'"]),
        (dict(dropout_position="mid"), ["dropout_position", "'mid'"]),
        (dict(lora_A_init="orthogonal"), ["lora_A_init", "'orthogonal'"]),
        (dict(kernels={"base_gemm": "cutlass"}), ["base_gemm", "'cutlass'"]),
    ],
)
def test_lora_settings_validate_in_post_init(kwargs, words):
    with pytest.raises(ValueError) as err:
        LoraSettings(**kwargs)
    for word in words:
        assert word in str(err.value)
    with pytest.raises(ValueError):
        LoraSettings().replace(**kwargs)


def test_resolve_applies_overrides_and_refuses_unknown_keys():
    base = LoraSettings(dim=4)
    assert LoraSettings.resolve(base, {"alpha": 8}, "f") == LoraSettings(dim=4, alpha=8)
    assert LoraSettings.resolve(None, {}, "f") == LoraSettings()
    with pytest.raises(TypeError, match=r"f got unexpected keyword argument\(s\) \['rank'\].*'dim'"):
        LoraSettings.resolve(None, {"rank": 8}, "f")
    with pytest.raises(TypeError, match="settings must be a LoraSettings"):
        LoraSettings.resolve(16, {}, "f")
    with pytest.warns(DeprecationWarning, match="lora_A_init_method"):
        assert LoraSettings.resolve(None, {"lora_A_init_method": "kaiming"}, "f").lora_A_init == "kaiming"


def test_peft_config_kernels_from_a_mapping_and_round_trip(tmp_path):
    cfg = PeftConfig(target_modules=["q_proj"], kernels={"base_gemm": "cublas", "fuse_proj": False})
    assert cfg.kernels == KernelOptions(base_gemm="cublas", fuse_proj=False)
    assert cfg.lora_settings().kernels is cfg.kernels
    d = cfg.to_dict()
    assert d["kernels"] == {"base_gemm": "cublas", "fuse_proj": False, "fast_launch": cfg.kernels.fast_launch}
    assert PeftConfig.from_dict(d) == cfg
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("peft:\n  target_modules: [q_proj]\n  kernels: {base_gemm: triton}\n")
    assert PeftConfig.from_yaml(recipe).kernels.base_gemm == "triton"
    assert PeftConfig(target_modules=["q_proj"]).kernels == KernelOptions()  # environment defaults


@pytest.mark.parametrize("kernels, words", [({"gemm": "cublas"}, ["PeftConfig.kernels", "'gemm'"]), ("cublas", ["mapping"])])
def test_bad_peft_config_kernels_name_the_field(kernels, words):
    with pytest.raises(ValueError) as err:
        PeftConfig(target_modules=["q_proj"], kernels=kernels)
    for word in words:
        assert word in str(err.value)
