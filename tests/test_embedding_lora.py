"""LoRA on `nn.Embedding` (`automodel_lora.embedding_lora`): the layer against a plain PyTorch reference (forward and
every gradient, fp32 and bf16, padding, repeated indices, `scale_grad_by_freq`, ranks 1 and 64), selection, merge,
tied input / output embeddings, HF PEFT's format both ways against the real `peft`, and the recipe."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from torch import nn

import automodel_lora as al
from automodel_lora.embedding_lora import EmbeddingLoRA, patch_embedding_module

from .conftest import assert_close, tiny_llama
from .recipe_helpers import adapter_tensors, run_recipe, tiny_raw_recipe

IDS = torch.tensor([[1, 5, 9, 33, 2, 100, 7, 64, 5, 5]])
TARGETS = ["embed_tokens", "q_proj"]


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@torch.no_grad()
def randomize(model):
    """Nonzero random adapters everywhere (A of an embedding starts at zero, B of a linear too)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.normal_(0, 0.3)


def reference(weight, A, B, ids, scale, padding_idx, scale_grad_by_freq):
    """`W[x] + s * A^T[x] B^T` by plain indexing; the adapter's padding column gets no gradient and, with
    `scale_grad_by_freq`, each index's gradient is divided by its count in the batch (the base's semantics)."""
    after_A = A.t()[ids]  # (..., r)
    if padding_idx is not None or scale_grad_by_freq:
        keep = torch.ones(ids.shape, dtype=after_A.dtype)
        if scale_grad_by_freq:
            keep = keep / torch.bincount(ids.flatten(), minlength=A.shape[1])[ids].to(after_A.dtype)
        if padding_idx is not None:
            keep = keep * (ids != padding_idx)
        after_A = after_A * keep[..., None] + (after_A * (1 - keep[..., None])).detach()  # gradient scaled only
    return weight[ids] + (after_A @ B.t()) * scale


def assert_grad_close(actual, expected, dtype, what):
    """A gradient is a sum over tokens of terms each rounded to `dtype`: in bf16 its error is relative to the
    largest terms, not to the element (a small element left by cancelling terms carries their rounding), so bf16
    gradients are compared scaled by their largest magnitude; fp32 ones element by element."""
    if dtype == torch.bfloat16:
        peak = expected.abs().max()
        actual, expected = actual.double() / peak, expected.double() / peak
    assert_close(actual, expected, dtype, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 64])
@pytest.mark.parametrize("padding_idx,scale_grad_by_freq", [(None, False), (3, False), (0, True)])
def test_forward_and_gradients_match_the_reference(dtype, rank, padding_idx, scale_grad_by_freq):
    emb = nn.Embedding(37, 23, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq, dtype=dtype)
    patch_embedding_module(emb, dim=rank, alpha=2 * rank)
    with torch.no_grad():
        emb.lora_embedding_A.normal_()
    ids = torch.tensor([[3, 5, 5, 0, 36, 3, 12], [5, 0, 0, 7, 3, 19, 5]])  # repeats and padding
    A = emb.lora_embedding_A.detach().float().requires_grad_()
    B = emb.lora_embedding_B.detach().float().requires_grad_()
    expected = reference(emb.weight.detach().float(), A, B, ids, emb.lora_settings.scale, padding_idx, scale_grad_by_freq)
    out = emb(ids)
    assert out.dtype == dtype and out.shape == (2, 7, 23)
    assert_close(out, expected, dtype, what="output")
    grad = torch.randn(out.shape)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    assert emb.weight.grad is None, "the base table is frozen"
    assert_grad_close(emb.lora_embedding_A.grad, A.grad, dtype, what="grad lora_embedding_A")
    assert_grad_close(emb.lora_embedding_B.grad, B.grad, dtype, what="grad lora_embedding_B")
    if padding_idx is not None:
        assert not emb.lora_embedding_A.grad[:, padding_idx].any(), "the adapter's padding column got a gradient"


def test_init_is_peft_s_and_the_state_dict_keys_are_peft_s():
    emb = nn.Embedding(11, 6)
    weight = emb.weight
    patch_embedding_module(emb, dim=4)
    assert isinstance(emb, nn.Embedding) and isinstance(emb, EmbeddingLoRA) and emb.weight is weight
    assert not emb.lora_embedding_A.any() and emb.lora_embedding_B.std() > 0.5  # A zero, B standard normal
    assert emb.lora_embedding_A.shape == (4, 11) and emb.lora_embedding_B.shape == (6, 4)
    assert set(emb.state_dict()) == {"weight", "lora_embedding_A", "lora_embedding_B"}
    assert [n for n, p in emb.named_parameters() if p.requires_grad] == ["lora_embedding_A", "lora_embedding_B"]
    ids = torch.tensor([0, 4, 10])
    assert torch.equal(emb(ids), weight[ids])
    copy = pickle.loads(pickle.dumps(emb))
    assert type(copy) is type(emb) and torch.equal(copy(ids), emb(ids))


def test_max_norm_renorms_the_looked_up_adapter_columns_as_peft_does():
    emb = nn.Embedding(9, 5, max_norm=1.0)
    patch_embedding_module(emb, dim=3)
    with torch.no_grad():
        emb.lora_embedding_A.fill_(2.0)
    emb(torch.tensor([1, 4]))
    norms = emb.lora_embedding_A.norm(dim=0)
    assert_close(norms[[1, 4]], torch.ones(2), what="renormed columns")
    assert_close(norms[[0, 2]], torch.full((2,), 2 * 3**0.5), what="untouched columns")


def test_lora_bias_on_an_embedding_is_refused():
    with pytest.raises(ValueError, match="lora_bias=True cannot be applied to the embedding"):
        patch_embedding_module(nn.Embedding(4, 4), lora_bias=True)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_bias=True cannot be applied to the embedding 'model\.embed_tokens'"):
        al.apply_lora_to_linear_modules(model, {"target_modules": TARGETS, "lora_bias": True})
    assert not al.lora_modules(model) and model.state_dict().keys() == before.keys()


def _dora_embedding_reference(emb, ids):
    """float64 PEFT DoRA on an embedding: m / ||E^T + s B A||_row (norm detached) * (E[x] + s A^T[x] B^T)."""
    E, A, B = emb.weight.double(), emb.lora_embedding_A.double(), emb.lora_embedding_B.double()
    m, s = emb.lora_magnitude_vector.double(), emb.lora_settings.scale
    norm = (E.T + s * B @ A).norm(dim=1).detach()  # (D,): over the vocabulary
    return (m / norm) * (E[ids] + s * A.T[ids] @ B.T)


def test_dora_on_an_embedding_equals_float64_peft_math_with_gradients():
    torch.manual_seed(3)
    emb = patch_embedding_module(nn.Embedding(37, 12), dim=4, alpha=8, use_dora=True)
    assert emb.lora_magnitude_vector.shape == (12,)
    ids = torch.tensor([[1, 5, 5, 36], [0, 2, 9, 5]])
    torch.testing.assert_close(emb(ids), emb.base_forward(ids))  # A = 0 at init: nothing changes
    with torch.no_grad():
        emb.lora_embedding_A.normal_()
        emb.lora_magnitude_vector.mul_(1.3)
    params = [emb.lora_embedding_A, emb.lora_embedding_B, emb.lora_magnitude_vector]
    got = emb(ids)
    got_grads = torch.autograd.grad(got.square().sum(), params)
    ref = _dora_embedding_reference(emb, ids)
    want_grads = torch.autograd.grad(ref.square().sum(), params)
    assert_close(got, ref.float(), torch.float32, "y")
    for name, g, w in zip(("dA", "dB", "dm"), got_grads, want_grads, strict=True):
        assert_close(g, w.float(), torch.float32, name)


def test_dora_on_an_embedding_with_max_norm_is_refused():
    with pytest.raises(ValueError, match="use_dora=True on the embedding Embedding with max_norm=1.0"):
        patch_embedding_module(nn.Embedding(10, 4, max_norm=1.0), use_dora=True)


def test_dora_on_an_embedding_round_trips_with_peft_and_merges(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    ours = copy.deepcopy(base)
    al.apply_lora_to_linear_modules(ours, al.PeftConfig(target_modules=TARGETS, dim=4, alpha=8, use_dora=True))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    al.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    made = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS,
                                                                    use_dora=True))
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.2)
    made.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    al.load_adapter(loaded, tmp_path / "peft")
    torch.testing.assert_close(loaded(input_ids=ids).logits, made(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    want = ours(input_ids=ids).logits
    al.merge_lora(ours)
    torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    al.unmerge_lora(ours)
    torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,adapted", [
    ({"target_modules": TARGETS}, True),
    ({"target_modules": ["*embed_tokens", "q_proj"]}, True),
    ({"match_all_linear": True}, False),
    ({"exclude_modules": ["q_proj"]}, False),
])
def test_embeddings_are_adapted_only_when_named(config, adapted):
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, config)
    assert isinstance(model.model.embed_tokens, EmbeddingLoRA) is adapted


def test_a_second_named_adapter_on_an_embedding_is_refused():
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, {"target_modules": TARGETS})
    with pytest.raises(ValueError, match=r"second adapter on the embedding\(s\) \['model\.embed_tokens'\]"):
        al.apply_lora_to_linear_modules(model, {"target_modules": TARGETS}, adapter_name="other")
    al.apply_lora_to_linear_modules(model, {"target_modules": ["q_proj"]}, adapter_name="other")  # linears: fine
    assert al.adapter_names(model) == ["default", "other"]
    with pytest.raises(ValueError, match=r"cannot combine adapters of embeddings \(\['model\.embed_tokens'\]"):
        al.add_weighted_adapter(model, ["default", "other"], [0.5, 0.5], "mix")
    expected = logits(model)
    al.set_adapter(model, "other")  # the embedding has no "other": it computes its base alone
    assert not model.model.embed_tokens.lora_enabled and not model.model.embed_tokens.lora_embedding_A.requires_grad
    al.set_adapter(model, "default")
    assert_close(logits(model), expected, what="logits back on the default adapter")
    al.delete_adapter(model, "default")  # the embedding loses its only adapter: it is a plain embedding again
    assert type(model.model.embed_tokens) is nn.Embedding and al.adapter_names(model) == ["other"]


def test_merge_equals_the_unmerged_output_and_remove_restores_the_model():
    model = tiny_llama()
    base_logits, base_table = logits(model), model.model.embed_tokens.weight.detach().clone()
    assert al.apply_lora_to_linear_modules(model, {"target_modules": TARGETS, "dim": 4, "alpha": 8}) == 3
    randomize(model)
    expected = logits(model)
    assert not torch.allclose(expected, base_logits)
    assert al.merge_lora(model) == 3
    assert_close(logits(model), expected, what="merged logits")
    al.unmerge_lora(model)
    assert_close(model.model.embed_tokens.weight, base_table, what="unmerged table")
    assert_close(logits(model), expected, what="unmerged logits")
    al.remove_lora(model)
    assert type(model.model.embed_tokens) is nn.Embedding and not any("lora" in k for k in model.state_dict())
    assert_close(logits(model), base_logits, what="logits after remove_lora")


def test_merge_and_save_writes_the_merged_table(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, {"target_modules": TARGETS, "dim": 4, "alpha": 8})
    randomize(model)
    assert al.merge_and_save(model, tmp_path) == 3
    assert_close(logits(LlamaForCausalLM.from_pretrained(tmp_path).eval()), logits(model), what="merged checkpoint")


def test_a_tied_input_embedding_adapter_leaves_the_head_alone_and_refuses_merge(tmp_path):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hidden = torch.randn(2, 5, 32)
    head_before = model.lm_head(hidden)
    al.apply_lora_to_linear_modules(model, {"target_modules": TARGETS})
    randomize(model)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head(hidden), head_before), "the output head changed"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (al.merge_lora, lambda m: al.remove_lora(m, merge=True), lambda m: al.merge_and_save(m, tmp_path)):
        with pytest.raises(ValueError, match=r"cannot merge the adapter of 'model\.embed_tokens'.*tied weights"):
            merge(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert not list(tmp_path.iterdir())


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


def test_adapter_saved_here_loads_in_peft_with_the_same_logits(tmp_path, peft):
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, {"target_modules": TARGETS, "dim": 4, "alpha": 8})
    randomize(model)
    al.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["embed_tokens", "q_proj"] and config["fan_in_fan_out"] is False
    keys = set(adapter_tensors(tmp_path))
    prefix = "base_model.model.model.embed_tokens."
    assert {prefix + "lora_embedding_A", prefix + "lora_embedding_B"} <= keys  # PEFT's names, no `.weight`
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert_close(logits(peft_model), logits(model), what="PEFT logits")


def test_adapter_saved_by_peft_loads_here_with_the_same_logits(tmp_path, peft):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(tiny_llama(), config).eval()
    randomize(peft_model)
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_llama()
    assert al.load_adapter(model, tmp_path) == 3
    assert isinstance(model.model.embed_tokens, EmbeddingLoRA)
    assert_close(logits(model), logits(peft_model), what="logits")
    assert al.load_adapter(model, tmp_path) == 3  # into the patched model: the same tensors again
    assert_close(logits(model), logits(peft_model), what="logits after reloading into the patched model")
    other = tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight[3] += 1  # PEFT saved the table it trained on: another one is refused
    with pytest.raises(ValueError, match=r"PEFT saved the table of 'model\.embed_tokens'.*differs from the model's"):
        al.load_adapter(other, tmp_path)
    assert not al.lora_modules(other)


def test_recipe_trains_the_embedding_adapter_and_saves_it_in_peft_format(tmp_path):
    peft_section = {"match_all_linear": False, "target_modules": TARGETS}
    summary, _ = run_recipe(tiny_raw_recipe(tmp_path, peft=peft_section, train={"max_steps": 3}))
    tensors = adapter_tensors(summary["adapter"])
    embedding_A = [t for key, t in tensors.items() if key.endswith("embed_tokens.lora_embedding_A")]
    assert len(embedding_A) == 1 and embedding_A[0].any(), "the embedding adapter was not trained (A starts at zero)"
    config = json.loads(open(f"{summary['adapter']}/adapter_config.json").read())
    assert "embed_tokens" in config["target_modules"]


def test_a_meta_built_embedding_is_initialised_by_init_lora_weights():
    model = nn.Sequential(nn.Embedding(10, 4, device="meta"), nn.Linear(4, 4, device="meta"))
    assert al.apply_lora_to_linear_modules(model, {"target_modules": ["0", "1"], "dim": 2}) == 2
    model.to_empty(device="cpu")
    assert al.init_lora_weights(model) == 2
    assert not model[0].lora_embedding_A.any() and model[0].lora_embedding_B.abs().sum() > 0  # PEFT's init
    assert model[1].lora_A.weight.abs().sum() > 0 and not model[1].lora_B.weight.any()
