"""Many adapters in one batch (``adapter_batch``): every sequence's logits equal those of the model running
that sequence's adapter alone (``set_adapter``; the base model for None), in float64 on the CPU, on the
PyTorch loop and (under ``TRITON_INTERPRET=1``) on the segmented kernels and, for decode, the gather kernel;
greedy generation likewise;
ranks that differ between adapters; modules that lack one of the adapters; integer ids; refusals.

float64 models, but HF's RMSNorm normalises in float32 whatever the model's dtype: the mixed batch and the
one-adapter runs differ by summation order (1e-16), which can flip a float32 rounding there (6e-8 relative)
and carry on: 1e-6 of the largest logit or gradient. An adapter applied to the wrong sequence moves logits by
O(0.1) here.
"""

from __future__ import annotations

import copy

import pytest
import torch

import automodel_lora as al
from automodel_lora import mixed_adapters
from automodel_lora.kernels.backend import use_kernels_for

from .conftest import tiny_llama

TOL = 1e-6


def _model_with_adapters(twin: bool = False):
    """Adapters ``"default"`` (rank 4 on every linear), ``"b"`` (rank 7 on three), ``"c"`` (rank 2, rsLoRA), and with
    ``twin`` ``"d"``: the rank, scale and modules of ``"default"``, other weights."""
    torch.manual_seed(0)
    model = tiny_llama()
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4, alpha=8))
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj", "v_proj", "down_proj"], dim=7,
                                                         alpha=3), adapter_name="b")
    al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=2, alpha=4, use_rslora=True),
                                    adapter_name="c")
    if twin:
        al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=4, alpha=8), adapter_name="d")
    model.double()  # every adapter in float64 too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.eval()


def _alone(model, name, ids):
    if name is None:
        with al.disable_adapter(model):
            return model(input_ids=ids).logits
    al.set_adapter(model, name)
    try:
        return model(input_ids=ids).logits
    finally:
        al.set_adapter(model, "default")


@pytest.mark.parametrize("batch", [["default", "b", None, "c", "b"], [None, None], ["c"], [2, -1, 1, 0]])
def test_each_sequence_gets_exactly_its_own_adapter(batch):
    model = _model_with_adapters()
    ids = torch.randint(0, 128, (len(batch), 9), generator=torch.Generator().manual_seed(1))
    with al.adapter_batch(model, batch):
        mixed = model(input_ids=ids).logits
    names = al.adapter_names(model)
    for i, a in enumerate(batch):
        name = names[a] if isinstance(a, int) and a >= 0 else (None if a == -1 else a)
        want = _alone(model, name, ids[i : i + 1])[0]
        assert (mixed[i] - want).abs().max() <= TOL * want.abs().max(), (i, a)
    assert all("forward" not in m.__dict__ for _, m in al.lora_modules(model))  # nothing left behind


def test_the_check_can_tell_adapters_apart():
    model = _model_with_adapters()
    ids = torch.randint(0, 128, (2, 9))
    with al.adapter_batch(model, ["b", "c"]):
        mixed = model(input_ids=ids).logits
    assert (mixed[0] - _alone(model, "c", ids[:1])[0]).abs().max() > 1e3 * TOL * mixed.abs().max()


def test_greedy_generation_with_mixed_adapters_equals_each_alone():
    model = _model_with_adapters()
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    batch = ["b", None, "default"]
    with al.adapter_batch(model, batch):
        mixed = model.generate(prompt, max_new_tokens=6, do_sample=False)
    for i, name in enumerate(batch):
        if name is None:
            with al.disable_adapter(model):
                want = model.generate(prompt[i : i + 1], max_new_tokens=6, do_sample=False)
        else:
            al.set_adapter(model, name)
            want = model.generate(prompt[i : i + 1], max_new_tokens=6, do_sample=False)
            al.set_adapter(model, "default")
        assert torch.equal(mixed[i], want[0]), (i, name)


def test_refusals_name_the_problem():
    model = _model_with_adapters()
    with pytest.raises(ValueError, match="has no adapter 'nope'; it has"):
        with al.adapter_batch(model, ["nope"]):
            pass
    with pytest.raises(ValueError, match="adapter id 7 is out of range"):
        with al.adapter_batch(model, [7]):
            pass
    with al.adapter_batch(model, ["b", "c"]):
        with pytest.raises(ValueError, match=r"input of shape \(3, 4, 32\) is not 2 sequences"):
            model(input_ids=torch.randint(0, 128, (3, 4)))
    with pytest.raises(ValueError, match=r"decode_kernel='bgmv'; pass one of \('auto', 'gather', 'segmented'\)"):
        with al.adapter_batch(model, ["b"], decode_kernel="bgmv"):
            pass


def test_float32_mixed_batch_on_the_kernel_path_equals_each_alone():
    """float32 (the segmented kernels run under TRITON_INTERPRET=1 or on CUDA; float64 takes the PyTorch
    loop). The one-adapter run scales the projection before B, the stack folds the scale into B, and the
    sums run in other orders: float32 roundings (1.2e-7) through two layers and the head, measured 1.6e-5
    of the largest logit; 1e-4 keeps three orders of magnitude below a wrong adapter (O(0.1))."""
    model = _model_with_adapters().float()
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(3))
    batch = ["c", None, "b", "c"]
    with al.adapter_batch(model, batch):
        mixed = model(input_ids=ids).logits
    for i, name in enumerate(batch):
        want = _alone(model, name, ids[i : i + 1])[0]
        assert (mixed[i] - want).abs().max() <= 1e-4 * want.abs().max(), (i, name)
    al.stack_adapters(model, ["b", "c"], max_num_loras=4)  # the persistent stacks, read by the kernels
    with al.adapter_batch(model, batch):
        stacked = model(input_ids=ids).logits
    assert (stacked - mixed).abs().max() <= 1e-4 * mixed.abs().max()


def _decode_step(model, prompt, nxt, **block):
    """(the logits of one decode step after ``prompt``, through the KV cache), inside ``adapter_batch(**block)``
    when given, else with the adapter in use."""
    def step():
        out = model(input_ids=prompt, use_cache=True)
        # transformers 5.25 names the cache ``cache``; earlier 5.x releases ``past_key_values``
        kw = {"cache": out.cache} if hasattr(out, "cache") else {"past_key_values": out.past_key_values}
        return model(input_ids=nxt, **kw).logits[:, -1]  # (batch, V)
    if not block:
        return step()
    with al.adapter_batch(model, **block):
        return step()


def test_float32_decode_on_the_gather_kernel_equals_each_alone_and_the_segmented_kernel(monkeypatch):
    """Decode (one row per sequence, no gradient) takes ``gather_mm`` where the kernels run (TRITON_INTERPRET=1
    or CUDA), prefill the segmented kernel; ``decode_kernel="segmented"`` keeps decode on it too. Adapters
    unsorted, repeated, a sequence without one, one adapter of the model in no sequence. Against each sequence
    alone: the float32 bound of the prefill test above (1e-4). Gather against segmented: the same sums in
    other orders, fp32 roundings through two layers and the head: 1e-5."""
    from automodel_lora import mixed_adapters
    from automodel_lora.kernels.backend import use_kernels_for
    from automodel_lora.kernels.gather_mm import gather_mm

    rows = []  # the row count of every gather_mm call of the blocks

    def spy(x, *args, **kwargs):
        rows.append(x.shape[0])
        return gather_mm(x, *args, **kwargs)

    monkeypatch.setattr(mixed_adapters, "gather_mm", spy)
    model = _model_with_adapters().float()
    g = torch.Generator().manual_seed(8)
    prompt, nxt = torch.randint(0, 128, (5, 6), generator=g), torch.randint(0, 128, (5, 1), generator=g)
    batch = ["c", None, "c", "default", "c"]  # "b" in no sequence
    with torch.no_grad():
        got = _decode_step(model, prompt, nxt, adapters=batch)  # "auto": two adapters in the batch, gather
        assert (got - _decode_step(model, prompt, nxt, adapters=batch, decode_kernel="gather")).abs().max() == 0
        gathered = len(rows)
        seg = _decode_step(model, prompt, nxt, adapters=batch, decode_kernel="segmented")
        assert len(rows) == gathered  # the segmented block calls no gather_mm
        for i, name in enumerate(batch):
            if name is None:
                with al.disable_adapter(model):
                    want = _decode_step(model, prompt[i : i + 1], nxt[i : i + 1])[0]
            else:
                al.set_adapter(model, name)
                want = _decode_step(model, prompt[i : i + 1], nxt[i : i + 1])[0]
                al.set_adapter(model, "default")
            assert (got[i] - want).abs().max() <= 1e-4 * want.abs().max(), (i, name)
    assert (got - seg).abs().max() <= 1e-5 * seg.abs().max()
    kernels = use_kernels_for(prompt.float())
    assert set(rows) == ({5} if kernels else set()) and (gathered > 0) == kernels  # decode's 5 rows, never prefill's 30


def _grads_alone(model, name, ids):
    """{param name: grad} of adapter ``name`` (in place, so under the one-adapter names) from its sequences."""
    al.set_adapter(model, name)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits[0]  # (T, V); HF's own loss would upcast to float32
    torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n
             and "lora_inactive" not in n}
    al.set_adapter(model, "default")
    return grads


def _holder_grads(model, name):
    """{one-adapter param name: grad} of adapter ``name`` wherever it lives now."""
    from automodel_lora.adapter_slots import holder_of

    out = {}
    for fqn, m in al.lora_modules(model):
        h = holder_of(m, name)
        if h is not None and h.lora_A.weight.grad is not None:
            out[f"{fqn}.lora_A.weight"] = h.lora_A.weight.grad.clone()
            out[f"{fqn}.lora_B.weight"] = h.lora_B.weight.grad.clone()
    return out


def _mixed_grads(model, ids, batch, monkeypatch, uniform_scale: float):
    """{adapter: {param name: grad}} of one mixed step (loss = the sum over sequences of each sequence's mean token
    loss); adapters outside ``batch`` get none. Where the segmented kernels run, they got ``uniform_scale``
    (``_trained_stacks``: the weights as they are) when the batch's adapters share rank and scale, else the scaled
    stacks and 1."""
    scales = []
    real = mixed_adapters.segmented_lora
    monkeypatch.setattr(mixed_adapters, "segmented_lora", lambda *a: scales.append(a[6]) or real(*a))  # a[6]: scale
    model.zero_grad(set_to_none=True)
    with al.adapter_batch(model, batch):  # grouped by adapter, the base-only sequences last
        logits = model(input_ids=ids).logits
        losses = [torch.nn.functional.cross_entropy(logits[i, :-1], ids[i, 1:]) for i in range(len(batch))]
        sum(losses[:3]).backward()
    if use_kernels_for(logits):
        assert set(scales) == ({uniform_scale} if batch[0] == "default" else {1.0}), scales
    names = list(dict.fromkeys(b for b in batch if b))
    for other in {"default", "b", "c", "d"} - set(names):
        assert not _holder_grads(model, other)  # not in the batch: no gradient
    return {name: _holder_grads(model, name) for name in names}


def _separate_grads(model, ids, batch):
    """{adapter: {param name: grad}}: each adapter of ``batch`` run alone on each of its sequences, summed."""
    out = {}
    for name in dict.fromkeys(b for b in batch if b):
        rows = slice(batch.index(name), len(batch) - batch[::-1].index(name))
        want = out.setdefault(name, {})
        for i in range(rows.start, rows.stop):  # the mean loss per sequence, as above
            for k, g in _grads_alone(model, name, ids[i : i + 1]).items():
                want[k] = want.get(k, 0) + g
    return out


def _check_mixed_training(model, ids, batch, tol, monkeypatch, uniform_scale: float):
    """Each adapter of ``batch`` gets the gradient of its own sequences run alone (within ``tol`` of the
    largest), the others none."""
    mixed = _mixed_grads(model, ids, batch, monkeypatch, uniform_scale)
    for name, want in _separate_grads(model, ids, batch).items():
        assert mixed[name].keys() == want.keys() and want
        scale = max(g.abs().max() for g in want.values())
        for k in want:
            assert (mixed[name][k] - want[k]).abs().max() <= tol * scale, (name, k)


BATCHES = pytest.mark.parametrize("batch", [["b", "b", "c", None, None], ["default", "d", "d", None, None]],
                                  ids=["ranks-differ", "one-rank-and-scale"])


@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL), (torch.float32, 1e-4)])
@BATCHES
def test_training_a_mixed_batch_gives_each_adapter_the_gradient_of_its_own_sequences(dtype, tol, batch, monkeypatch):
    """Loss = the sum over sequences of each sequence's mean token loss, so each adapter's gradient is that of
    its own sequences run alone. float64 on the PyTorch loop; float32 on the segmented kernels under
    TRITON_INTERPRET=1 (float32 roundings through two layers and the head, 1e-4 of the largest gradient)."""
    model = _model_with_adapters(twin=True).to(dtype).train()
    ids = torch.randint(0, 128, (5, 8), generator=torch.Generator().manual_seed(4))
    _check_mixed_training(model, ids, batch, tol, monkeypatch, uniform_scale=2.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@BATCHES
def test_bf16_training_with_fp32_adapters_on_the_gpu(batch, monkeypatch):
    """A bf16 base with fp32 master adapters, the recipe's setting, on the segmented kernels (which cast the fp32
    weights per tile) against each adapter alone on the single-adapter path, both measured against the same
    weights in float64. Both round through bf16 activations in two layers and the head, in different orders, so
    their errors are of one size but not one value: per gradient tensor, the mixed step's relative error (Frobenius
    norm) is at most 3 times the single-adapter path's, and never held below 8 bf16 ulps. A wrong row, scale or
    adapter is off by the order of the gradient itself (relative error ~1)."""
    model = _model_with_adapters(twin=True).to("cuda", torch.bfloat16).train()
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    reference = copy.deepcopy(model).double()  # the rounded weights, computed exactly
    ids = torch.randint(0, 128, (5, 8), generator=torch.Generator().manual_seed(4)).cuda()
    mixed = _mixed_grads(model, ids, batch, monkeypatch, uniform_scale=2.0)
    alone = _separate_grads(model, ids, batch)
    for name, exact in _separate_grads(reference, ids, batch).items():
        assert mixed[name].keys() == alone[name].keys() == exact.keys()
        for k, g in exact.items():
            rel_mixed = (mixed[name][k].double() - g).norm() / g.norm()
            rel_alone = (alone[name][k].double() - g).norm() / g.norm()
            assert rel_mixed <= max(3 * rel_alone, 8 * 2.0**-8), (name, k, rel_mixed, rel_alone)


def test_training_restores_the_trainable_flags_and_refuses_dropout():
    model = _model_with_adapters().train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with al.adapter_batch(model, ["b", "c"]):
        pass
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    model.model.layers[0].self_attn.q_proj.lora_dropout.p = 0.1
    with pytest.raises(ValueError, match="has dropout 0.1 and the model is training"):
        with al.adapter_batch(model, ["default"]):
            pass


def test_hooks_nesting_and_disabled_blocks_are_refused_and_left_as_they_were():
    model = _model_with_adapters()
    q = model.model.layers[0].self_attn.q_proj
    hook = q.forward  # a bound method standing in for a hook's instance forward
    q.forward = hook
    with pytest.raises(ValueError, match="has a forward of its own on the instance"):
        with al.adapter_batch(model, ["b"]):
            pass
    assert q.__dict__["forward"] is hook
    del q.forward
    with al.adapter_batch(model, ["b"]):
        with pytest.raises(ValueError, match="do not nest blocks"):
            with al.adapter_batch(model, ["c"]):
                pass
        assert "forward" in q.__dict__  # the outer block's forward survives the refused inner one
    with al.disable_adapter(model):
        with pytest.raises(ValueError, match="inside `with disable_adapter"):
            with al.adapter_batch(model, ["b"]):
                pass


def test_no_public_name_is_shadowed_by_a_submodule_of_the_same_name():
    """Importing a submodule sets the package attribute of its name: a lazily exported function named as a
    module would become that module once anything imported it (``al.adapter_batch`` did, after the recipe)."""
    import importlib
    import inspect
    import pkgutil

    for info in pkgutil.iter_modules(al.__path__):
        importlib.import_module(f"automodel_lora.{info.name}")
    shadowed = [name for name in al.__all__ if inspect.ismodule(getattr(al, name))]
    assert not shadowed, shadowed
    assert callable(al.adapter_batch)


def test_persistent_stacks_give_the_same_logits_fill_free_slots_in_place_and_refresh():
    model = _model_with_adapters()
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(6))
    batch = ["b", None, "c"]
    with al.adapter_batch(model, batch):
        want = model(input_ids=ids).logits
    slots = al.stack_adapters(model, ["b"], max_num_loras=3)
    assert slots == {"b": 0}
    q = model.model.layers[0].self_attn.q_proj
    buffer = q.__dict__["lora_stack"].A.data_ptr()
    assert al.stack_adapters(model, ["c"]) == {"b": 0, "c": 1}  # into a free slot
    assert q.__dict__["lora_stack"].A.data_ptr() == buffer  # no reallocation
    with al.adapter_batch(model, batch):
        got = model(input_ids=ids).logits
    assert (got - want).abs().max() <= TOL * want.abs().max()
    from automodel_lora.adapter_slots import holder_of

    with torch.no_grad():  # an adapter trained after stacking: its slot is refreshed at the next block
        holder_of(q, "c").lora_B.weight.mul_(2.0)
    with al.adapter_batch(model, batch):
        got = model(input_ids=ids).logits
    want_c = _alone(model, "c", ids[2:3])[0]
    assert (got[2] - want_c).abs().max() <= TOL * want_c.abs().max()
    al.unstack_adapters(model, ["b"])
    assert al.stack_adapters(model, ["default"]) == {"c": 1, "default": 0}  # the freed slot is reused
    with pytest.raises(ValueError, match="max_num_loras=1 cannot hold 3 adapters"):
        al.stack_adapters(model, ["b"], max_num_loras=1)
    al.unstack_adapters(model)
    assert "lora_stack" not in q.__dict__ and al.adapter_stacks.stacked_slots(model) == {}


def test_auto_decode_kernel_is_gather_and_segmented_can_be_asked_for(monkeypatch):
    """``decode_kernel="auto"`` (the default) takes the gather kernel for one adapter and for several;
    ``"segmented"`` keeps decode on the segmented kernel."""
    from automodel_lora import mixed_adapters

    seen = []
    monkeypatch.setattr(mixed_adapters, "_batched_forward",
                        lambda *args, **kwargs: seen.append(args[6]) or (lambda x: x))
    model = _model_with_adapters().float()
    for batch in (["c", None, "c"], [None, None], ["c", "b"], ["b", "c", "b"]):
        seen.clear()
        with al.adapter_batch(model, batch):
            pass
        assert seen and set(seen) == {"gather"}, (batch, seen)
    with al.adapter_batch(model, ["c", "b"], decode_kernel="segmented"):
        pass
    assert set(seen[-1:]) == {"segmented"}


def test_a_block_installed_again_reads_the_weights_as_they_are_now():
    """``mixed_adapters.Block`` (what ``adapter_batch`` installs once, and the recipe's replayed mixed step around
    each step): after ``remove`` the weights may change; a later install computes with the new ones, as a fresh
    block does (the detached stacks and fused q / k / v stack of the calls without gradient are dropped)."""
    from automodel_lora.mixed_adapters import Block

    model = _model_with_adapters()  # eval mode: calls without gradient read the detached stacks
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    batch = ["default", "b", None]
    block = Block(model, batch)
    block.install()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    block.remove()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    block.install()
    with torch.no_grad():
        again = model(input_ids=ids).logits
    block.remove()
    with al.adapter_batch(model, batch), torch.no_grad():
        fresh = model(input_ids=ids).logits
    assert (again - before).abs().max() > 1e-3 and torch.equal(again, fresh)
