"""`PeftConfig.modules_to_save`: whole modules trained fully beside the adapters, saved and loaded as HF PEFT does."""

import json

import pytest
import torch
from safetensors.torch import load_file

import automodel_lora as al

from .conftest import assert_close, tiny_llama, tiny_llama_config

TARGETS = ["q_proj", "v_proj"]


def _seq_cls(seed=1234):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()


def _ids():
    return torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _set_values(params):
    torch.manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn_like(p) * 0.1)


def _ours(seed=1234):
    model = _seq_cls(seed)
    al.apply_lora_to_linear_modules(
        model, al.PeftConfig(target_modules=TARGETS, modules_to_save=["score"], dim=4, alpha=8, use_triton=False)
    )
    _set_values([p for n, p in model.named_parameters() if "lora_B" in n or n.startswith("score.")])
    return model


def test_our_save_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = _ours()
    al.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.score.weight" in keys
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    peft_model = PeftModel.from_pretrained(_seq_cls(), tmp_path).eval()
    with torch.no_grad():
        expected = model(_ids()).logits
        assert_close(peft_model(_ids()).logits, expected, what="PEFT logits of our adapter")
        assert not torch.allclose(_seq_cls()(_ids()).logits, expected)  # the head and adapters do change the output


def test_peft_adapter_loads_in_ours(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        _seq_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=TARGETS, modules_to_save=["score"], r=4, lora_alpha=8)
    ).eval()
    _set_values([p for n, p in peft_model.named_parameters() if "lora_B" in n or "modules_to_save" in n])
    peft_model.save_pretrained(tmp_path)
    model = _seq_cls()
    assert al.load_adapter(model, tmp_path, use_triton=False) == 4
    with torch.no_grad():
        assert_close(model(_ids()).logits, peft_model(_ids()).logits, what="our logits of PEFT's adapter")
    assert model.score.weight.requires_grad
    # saved again, the head comes along
    al.save_adapter(model, tmp_path / "again")
    assert "base_model.model.score.weight" in load_file(tmp_path / "again" / "adapter_model.safetensors")


def test_module_to_save_trains_and_base_is_frozen():
    model = _ours()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable
    assert all("lora_" in n or n == "score.weight" for n in trainable), trainable
    model(_ids(), labels=torch.tensor([0, 2])).loss.backward()
    assert model.score.weight.grad is not None and model.score.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert set(al.lora_state_dict(model)) >= {"score.weight"}


def test_remove_lora_unmarks():
    model = _ours()
    al.remove_lora(model)
    assert not any(getattr(m, "_lora_module_to_save", False) for m in model.modules())


def test_entry_matching_nothing_is_an_error():
    model = _seq_cls()
    with pytest.raises(ValueError, match="'scroe' matches no module"):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=TARGETS, modules_to_save=["scroe"]))
    assert not any(p.requires_grad is False for p in model.parameters())  # untouched
    cfg = al.PeftConfig(target_modules=TARGETS, modules_to_save=["scroe", "score"], allow_unmatched_targets=True,
                        use_triton=False)
    al.apply_lora_to_linear_modules(model, cfg)
    assert model.score.weight.requires_grad


def test_module_both_targeted_and_saved_is_an_error():
    with pytest.raises(ValueError, match="both target_modules and modules_to_save"):
        al.PeftConfig(target_modules=["q_proj", "score"], modules_to_save=["score"])
    model = _seq_cls()
    with pytest.raises(ValueError, match="is in PeftConfig.modules_to_save and .* gets a LoRA adapter"):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj"], modules_to_save=["self_attn"]))
    assert not any(getattr(m, "_lora_module_to_save", False) for m in model.modules())


def test_tied_module_to_save_is_refused_unless_both_are_saved(tmp_path):
    from peft import PeftModel

    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tied"):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=TARGETS, modules_to_save=["lm_head"]))
    cfg = al.PeftConfig(target_modules=TARGETS, modules_to_save=["lm_head", "embed_tokens"], use_triton=False)
    al.apply_lora_to_linear_modules(model, cfg)
    _set_values([model.lm_head.weight, *(p for n, p in model.named_parameters() if "lora_B" in n)])
    al.save_adapter(model, tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= keys
    peft_model = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path).eval()
    with torch.no_grad():
        assert_close(peft_model(_ids()).logits, model(_ids()).logits, what="tied lm_head/embed_tokens")


def test_config_round_trip_and_glob_refused():
    cfg = al.PeftConfig(target_modules=TARGETS, modules_to_save="score")
    assert cfg.modules_to_save == ["score"]
    assert al.PeftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="is a pattern"):
        al.PeftConfig(target_modules=TARGETS, modules_to_save=["*.score"])


def test_file_key_outside_modules_to_save_is_refused(tmp_path):
    model = _ours()
    al.save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["modules_to_save"] = None
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(al.AdapterFormatError, match="score.weight"):
        al.load_adapter(_seq_cls(), tmp_path, use_triton=False)
