"""``causal_sdpa``: a transformers model's SDPA attention that keeps SDPA's causal path during a CUDA graph capture.

A capture can't be made on the CPU, but transformers decides on the mask from
``torch.cuda.is_current_stream_capturing()``; the tests set that to True to see what a capture sees. Checked:
the switched model calls SDPA with ``is_causal=True`` and no mask where the plain model, capturing, builds one;
a padding mask is still passed; logits are those of the plain SDPA model, padded or not; models that are not
SDPA are left alone; the model's implementation is set back after the ``with``, also after an error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from automodel_lora import CAUSAL_SDPA, causal_sdpa  # noqa: E402
from automodel_lora.sdpa_capture import _causal_sdpa_mask  # noqa: E402


def _model(kind: str = "llama", attn: str = "sdpa"):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=97, attn_implementation=attn)
        return transformers.LlamaForCausalLM(cfg).train()
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, attn_implementation=attn)
    return transformers.Qwen2ForCausalLM(cfg).train()


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The ``(attn_mask shape or None, is_causal)`` of every SDPA call transformers makes."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask")
        calls.append((None if mask is None else tuple(mask.shape), kwargs.get("is_causal")))
        return real(*args, **kwargs)

    import transformers.integrations.sdpa_attention as sdpa_module
    monkeypatch.setattr(sdpa_module.torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("release", ["current", "older"])
def test_capture_keeps_the_causal_path_without_a_mask(kind, release, sdpa_calls, monkeypatch):
    """``older``: transformers releases whose own causal-skip test refuses during any capture (as 5.17 does)."""
    model, ids = _model(kind), torch.randint(0, 97, (2, 12))
    _capturing(monkeypatch)
    if release == "older":
        monkeypatch.setattr(transformers.masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: False)
    with causal_sdpa(model) as switched:
        assert switched and model.config._attn_implementation == CAUSAL_SDPA
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert sdpa_calls == [(None, True)] * 2, sdpa_calls
    assert model.config._attn_implementation == "sdpa"
    # What the switch is for: the plain model, capturing, builds the (B, 1, T, T) mask and loses is_causal.
    sdpa_calls.clear()
    model(input_ids=ids, labels=ids, use_cache=False)
    assert sdpa_calls and sdpa_calls[0][0] == (2, 1, 12, 12), sdpa_calls


def test_a_padding_mask_is_still_passed_during_a_capture(sdpa_calls, monkeypatch):
    model, ids = _model(), torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    _capturing(monkeypatch)
    with causal_sdpa(model):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert sdpa_calls and all(shape == (2, 1, 12, 12) for shape, _ in sdpa_calls), sdpa_calls


@pytest.mark.parametrize("padded", [False, True])
def test_logits_are_those_of_plain_sdpa(padded):
    model, ids = _model("qwen2"), torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        mask[0, 5:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with causal_sdpa(model):
            got = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions' logits are not defined by either path
    torch.testing.assert_close(got[keep], want[keep], rtol=0, atol=0)


def test_models_without_sdpa_are_left_alone(sdpa_calls):
    eager = _model(attn="eager")
    with causal_sdpa(eager) as switched:
        assert not switched and eager.config._attn_implementation == "eager"
    with causal_sdpa(torch.nn.Linear(3, 3)) as switched:
        assert not switched


def test_the_implementation_is_set_back_after_an_error():
    model = _model()
    with pytest.raises(RuntimeError, match="inside"), causal_sdpa(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def _mask_args(**over):
    args = dict(batch_size=2, q_length=8, kv_length=8, q_offset=0, kv_offset=0, attention_mask=None,
                allow_is_causal_skip=False, device="cpu")
    return {**args, **over}


@pytest.mark.parametrize("over, skipped", [
    ({}, True),
    ({"local_size": 16}, True),  # a window longer than the keys: causal
    ({"local_size": 8}, False),  # the window cuts in
    ({"attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3], dtype=torch.bool)}, False),
    ({"q_length": 4, "q_offset": 4}, False),  # queries at later positions than the first keys
])
def test_the_mask_is_skipped_only_where_sdpas_causal_flag_is_the_mask(over, skipped):
    mask = _causal_sdpa_mask(**_mask_args(**over))
    assert (mask is None) == skipped
    if mask is not None:
        assert mask.shape[0] == 2 and mask.shape[-1] == 8 and mask.dtype == torch.bool


def test_a_mask_overlaid_by_the_model_is_left_to_transformers():
    """``use_vmap``: transformers' sign of an overlay (image tokens, bidirectional blocks); the mask stays."""
    mask = _causal_sdpa_mask(**_mask_args(use_vmap=True))
    assert mask is not None and mask.shape[-1] == 8


def test_a_model_that_declines_the_switch_is_reported_unswitched(monkeypatch):
    model = _model()
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, name: None)  # declines, as transformers may
    with causal_sdpa(model) as switched:
        assert not switched and model.config._attn_implementation == "sdpa"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gpu_a_real_capture_calls_the_causal_kernels_and_replays_the_eager_logits(kind, sdpa_calls):
    """On a GPU, in a real CUDA graph capture (not the flag set by hand): inside ``causal_sdpa`` the captured
    forward calls SDPA with no mask and ``is_causal=True``, and a replay gives the eager model's logits."""
    model = _model(kind).cuda().eval()
    ids = torch.randint(0, 97, (2, 64), device="cuda")
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        graph = torch.cuda.CUDAGraph()
        with causal_sdpa(model):
            model(input_ids=ids, use_cache=False)  # warm-up outside the capture
            torch.cuda.synchronize()
            sdpa_calls.clear()
            with torch.cuda.graph(graph):
                got = model(input_ids=ids, use_cache=False).logits
    assert sdpa_calls == [(None, True)] * 2, sdpa_calls
    graph.replay()
    torch.cuda.synchronize()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
