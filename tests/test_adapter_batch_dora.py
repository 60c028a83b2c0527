"""DoRA and ``lora_bias`` adapters in a mixed batch (``adapter_batch``, ``mixed_epilogue.py``): every sequence's
logits, and in training every adapter's gradients (``lora_A``, ``lora_B``, ``lora_B``'s bias, the magnitude),
equal those of the adapter run alone (``set_adapter``), beside plain adapters and base-model rows, on a model with
biased projections (the DoRA rows' base bias is kept out of the scale).

Tolerances as in ``test_adapter_batch.py``: float64 on the PyTorch loop, 1e-6 of the largest logit or gradient
(HF's RMSNorm rounds through float32 whatever the model's dtype); float32 on the kernels (TRITON_INTERPRET=1),
1e-4. A DoRA scale or a bias applied to the wrong sequence moves logits by O(0.1) here.
"""

from __future__ import annotations

import pytest
import torch

import automodel_lora as al
from automodel_lora.adapter_slots import holder_of
from automodel_lora.dora import magnitude_of

from .conftest import tiny_llama
from .test_adapter_batch import _alone

TOL = 1e-6


def _model(dora2: bool = False):
    """Adapters ``"default"`` (plain, rank 4), ``"dora"`` (DoRA, rank 3, magnitudes moved off their initial norms)
    and ``"biased"`` (``lora_bias``, rank 2, on three projections), on a Llama whose projections have biases; with
    ``dora2`` a second DoRA adapter (rank 2)."""
    torch.manual_seed(0)
    model = tiny_llama(attention_bias=True, mlp_bias=True)
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4, alpha=8))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=3, alpha=6, use_dora=True),
                                    adapter_name="dora")
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj", "down_proj"], dim=2,
                                                         alpha=4, lora_bias=True), adapter_name="biased")
    if dora2:
        al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=2, alpha=4, use_dora=True),
                                        adapter_name="dora2")
    model.double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "bias" in n:
                p.normal_(0, 0.3)
            if "lora_magnitude_vector" in n:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model.eval()


def _check_logits(model, batch, tol, seed=1, stacked=()):
    ids = torch.randint(0, 128, (len(batch), 7), generator=torch.Generator().manual_seed(seed))
    if stacked:
        al.stack_adapters(model, list(stacked), max_num_loras=4)
    with al.adapter_batch(model, batch):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(batch):
        want = _alone(model, name, ids[i : i + 1])[0]
        assert (mixed[i] - want).abs().max() <= tol * want.abs().max(), (i, name)


@pytest.mark.parametrize("batch", [["dora", "biased", None, "default", "dora"], ["dora"], ["biased", None]])
def test_dora_and_lora_bias_rows_equal_each_adapter_alone(batch):
    _check_logits(_model(), batch, TOL)


def test_the_check_sees_rows_left_unfinished(monkeypatch):
    """The check can fail: with the finish switched off, the DoRA and lora_bias rows miss by far more than TOL."""
    from automodel_lora import mixed_epilogue

    monkeypatch.setattr(mixed_epilogue.Epilogue, "__call__", lambda self, y, rows, grad: y)
    with pytest.raises(AssertionError):
        _check_logits(_model(), ["dora"], 1e3 * TOL)
    with pytest.raises(AssertionError):
        _check_logits(_model(), ["biased"], 1e3 * TOL)


def test_a_block_kept_across_set_adapter_and_in_place_updates_reads_the_adapters_as_they_are():
    """The recipe's replayed mixed step keeps one block for the run while evaluation calls ``set_adapter`` for each
    adapter in between (which moves adapters between holder objects), and an optimizer updates magnitudes and
    biases in place: the finish looks its adapters up by name and rebuilds its no-gradient tables when a tensor
    changed."""
    from automodel_lora.mixed_adapters import Block

    model = _model(dora2=True)
    batch = ["dora", "dora2", "biased", None]
    ids = torch.randint(0, 128, (len(batch), 6), generator=torch.Generator().manual_seed(7))

    def check(mixed):
        for i, name in enumerate(batch):
            want = _alone(model, name, ids[i : i + 1])[0]
            assert (mixed[i] - want).abs().max() <= TOL * want.abs().max(), (i, name)

    def run(block, between=None):
        """The block's logits, installed once: with ``between``, one call before it and the logits after it."""
        block.install()
        try:
            with torch.no_grad():
                if between is not None:
                    model(input_ids=ids)
                    between()
                return model(input_ids=ids).logits
        finally:
            block.remove()

    def optimizer_step():  # in place, on the magnitudes and biases alone
        with torch.no_grad():
            for _, module in al.lora_modules(model):
                for name in ("dora", "biased"):
                    h = holder_of(module, name)
                    if h is not None and magnitude_of(h) is not None:
                        magnitude_of(h).mul_(1.3)
                    if h is not None and h.lora_B.bias is not None:
                        h.lora_B.bias.add_(0.5)

    block = Block(model, batch)
    check(run(block))
    for name in ("dora2", "biased", "dora", "default"):  # what evaluating each adapter does
        al.set_adapter(model, name)
    check(run(block))
    mixed = run(block, between=optimizer_step)  # the tables built at the first call are rebuilt at the second
    al.set_adapter(model, "default")
    check(mixed)


def test_persistent_stacks_serve_dora_and_lora_bias_adapters():
    _check_logits(_model(), ["biased", "dora", None], TOL, stacked=("dora", "biased", "default"))


def test_float32_on_the_kernels_prefill_and_decode():
    """float32: the segmented kernels for prefill, the gather kernel for decode, where the kernels run."""
    model = _model().float()
    _check_logits(model, ["dora", None, "biased", "dora"], 1e-4, seed=3)
    prompt = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    batch = ["biased", "dora", None]
    with al.adapter_batch(model, batch):
        got = model(input_ids=prompt, use_cache=False).logits[:, -1]
    for i, name in enumerate(batch):
        want = _alone(model, name, prompt[i : i + 1])[0, -1]
        assert (got[i] - want).abs().max() <= 1e-4 * want.abs().max(), (i, name)


def _param_grads(model, name):
    """{module fqn + part: grad} of adapter ``name`` wherever it lives (A, B, B's bias, the magnitude)."""
    out = {}
    for fqn, m in al.lora_modules(model):
        h = holder_of(m, name)
        if h is None:
            continue
        parts = {"A": h.lora_A.weight, "B": h.lora_B.weight, "b": h.lora_B.bias, "m": magnitude_of(h)}
        out.update({f"{fqn}.{k}": t.grad.clone() for k, t in parts.items() if t is not None and t.grad is not None})
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL), (torch.float32, 1e-4)])
def test_training_gives_each_adapter_the_gradients_of_its_own_sequences(dtype, tol):
    """Loss = the sum of each sequence's mean token loss; sequences grouped by adapter, base-only last (the
    segmented kernels' order where they run). The magnitude's and the bias's gradients are checked too."""
    model = _model().to(dtype).train()
    batch = ["dora", "dora", "biased", "default", None]
    ids = torch.randint(0, 128, (len(batch), 8), generator=torch.Generator().manual_seed(5))
    model.zero_grad(set_to_none=True)
    with al.adapter_batch(model, batch):
        logits = model(input_ids=ids).logits
        sum(torch.nn.functional.cross_entropy(logits[i, :-1], ids[i, 1:]) for i in range(4)).backward()
    mixed = {name: _param_grads(model, name) for name in ("dora", "biased", "default")}
    for name in mixed:
        model.zero_grad(set_to_none=True)
        al.set_adapter(model, name)
        for i in [i for i, b in enumerate(batch) if b == name]:
            logits = model(input_ids=ids[i : i + 1]).logits[0]
            torch.nn.functional.cross_entropy(logits[:-1], ids[i, 1:]).backward()
        al.set_adapter(model, "default")
        want = _param_grads(model, name)
        assert mixed[name].keys() == want.keys() and want, name
        assert any(k.endswith(".m") for k in want) is (name == "dora")
        assert any(k.endswith(".b") for k in want) is (name == "biased")
        scale = max(g.abs().max() for g in want.values())
        for k, g in want.items():
            assert (mixed[name][k] - g).abs().max() <= tol * scale, (name, k)
