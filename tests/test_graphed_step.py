"""GraphedStep (forward + backward replayed as a CUDA graph) and the recipe's ``train.cuda_graphs``.

The CPU tests cover what needs no GPU: argument checks, the eager warm-up (gradients exactly those of
a plain backward), a capture refused for CPU inputs (error, or eager with the reason), and where the
recipe turns graphs on. The GPU tests (skipped without CUDA) compare graphed training with eager
training of the same LoRA model step for step: the replay runs the kernels the eager step ran, so the
losses and gradients must agree to the bit, barring the order of floating-point atomics (none in
these kernels); they are checked to a tolerance of a few float32 roundings.
"""

from __future__ import annotations

import copy

import pytest
import torch

from automodel_lora import GraphCaptureError, GraphedStep, PeftConfig, apply_lora_to_linear_modules
from automodel_lora.recipe.errors import ConfigError

from .recipe_helpers import run_recipe, step_losses, tiny_raw_recipe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _linear_step(seed=0, device="cpu"):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(5, 3).to(device)

    def fn(x, y):
        loss = ((lin(x) - y) ** 2).sum()
        return loss, loss * 2

    return lin, fn


# ---------------------------------------------------------------- CPU
def test_arguments_are_checked_with_the_fix_named():
    lin, fn = _linear_step()
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(fn, list(lin.parameters()), warmup=0)
    with pytest.raises(ValueError, match="max_graphs must be >= 1"):
        GraphedStep(fn, list(lin.parameters()), max_graphs=0)
    lin.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params\[1\] does not require grad"):
        GraphedStep(fn, list(lin.parameters()))
    step = GraphedStep(fn, [lin.weight])
    with pytest.raises(TypeError, match="input 1 is a float, not a tensor"):
        step(torch.zeros(2, 5), 1.0)


def test_warmup_calls_accumulate_exactly_the_gradients_of_a_plain_backward():
    lin, fn = _linear_step()
    ref, ref_fn = _linear_step()
    step = GraphedStep(fn, list(lin.parameters()), warmup=3)
    xs = [torch.randn(4, 5) for _ in range(2)]
    ys = [torch.randn(4, 3) for _ in range(2)]
    reported = [step(x, y) for x, y in zip(xs, ys, strict=True)]  # two micro-batches: the gradients add up
    want = []
    for x, y in zip(xs, ys, strict=True):
        obj, rep = ref_fn(x, y)
        obj.backward()
        want.append(rep)
    for got, w in zip(reported, want, strict=True):
        assert not got.requires_grad and torch.equal(got, w.detach())
    assert torch.equal(lin.weight.grad, ref.weight.grad) and torch.equal(lin.bias.grad, ref.bias.grad)


def test_a_capture_of_cpu_inputs_raises_naming_the_cause_and_the_fix():
    lin, fn = _linear_step()
    step = GraphedStep(fn, list(lin.parameters()), warmup=1)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    step(x, y)  # warm-up, eager
    with pytest.raises(GraphCaptureError, match="not on a CUDA device.*train.cuda_graphs=false"):
        step(x, y)


def test_with_fallback_a_failed_capture_runs_eagerly_and_records_why():
    lin, fn = _linear_step()
    ref, ref_fn = _linear_step()
    step = GraphedStep(fn, list(lin.parameters()), warmup=1, fallback=True)
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    for _ in range(3):
        step(x, y)
        ref_fn(x, y)[0].backward()
    assert torch.equal(lin.weight.grad, ref.weight.grad)
    assert not step.graphs
    (reason,) = step.eager_reasons.values()
    assert "not on a CUDA device" in reason


class _Env:
    def __init__(self, device="cuda", world_size=1):
        self.device, self.world_size = torch.device(device), world_size


@pytest.mark.parametrize(
    "setting, env, packing, compile_, hidden, on, why",
    [
        ("auto", _Env(), True, False, 896, True, "on"),
        ("auto", _Env(), True, False, 2048, True, "on"),
        ("auto", _Env(), True, False, 4096, False, "hidden size 4096 > 2048"),
        ("auto", _Env(), True, False, None, False, "hidden size unknown"),
        ("auto", _Env("cpu"), True, False, 896, False, "the device is cpu"),
        ("auto", _Env(world_size=2), True, False, 896, False, "2 processes"),
        ("auto", _Env(), True, True, 896, False, "train.compile is on"),
        ("auto", _Env(), False, False, 896, False, "data.packing is off"),
        (True, _Env(), True, False, 4096, True, "on"),
        (False, _Env(), True, False, 896, False, "train.cuda_graphs=false"),
    ],
)
def test_where_the_recipe_replays_cuda_graphs(setting, env, packing, compile_, hidden, on, why):
    from automodel_lora.recipe.graphs import use_cuda_graphs
    from automodel_lora.recipe.sections import DataConfig, TrainConfig

    tc = TrainConfig(cuda_graphs=setting, compile=compile_, max_steps=1)
    got_on, got_why = use_cuda_graphs(env, tc, DataConfig(path="x.jsonl", packing=packing), fused_loss=False,
                                      hidden=hidden)
    assert got_on is on and why in got_why


def test_cuda_graphs_true_where_they_cannot_run_is_a_config_error():
    from automodel_lora.recipe.graphs import use_cuda_graphs
    from automodel_lora.recipe.sections import DataConfig, TrainConfig

    with pytest.raises(ConfigError, match="`train.cuda_graphs: true` can't run here: the device is cpu"):
        use_cuda_graphs(_Env("cpu"), TrainConfig(cuda_graphs=True, max_steps=1), DataConfig(path="x.jsonl"),
                        fused_loss=False, hidden=896)
    with pytest.raises(ConfigError, match="can't run here: data.packing is off"):
        use_cuda_graphs(_Env(), TrainConfig(cuda_graphs=True, max_steps=1), DataConfig(path="x.jsonl", packing=False),
                        fused_loss=False, hidden=896)
    assert TrainConfig(max_steps=1).cuda_graphs == "auto"  # on where it can run
    with pytest.raises(ConfigError, match="train.cuda_graphs` must be true, false or auto"):
        TrainConfig(cuda_graphs="yes", max_steps=1)


def test_a_recipe_with_cuda_graphs_true_on_the_cpu_stops_before_training(tmp_path):
    raw = tiny_raw_recipe(tmp_path, train={"cuda_graphs": True, "device": "cpu"})
    with pytest.raises(ConfigError, match="the device is cpu"):
        run_recipe(raw)
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""  # stopped before the first step


# ---------------------------------------------------------------- GPU
def _tiny_lora_model(dropout=0.0, checkpointing=False, use_dora=False, nf4=False):
    """A 3-layer bf16 Llama with LoRA (or DoRA) on every projection; ``nf4``: its projections in bitsandbytes NF4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=301, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if nf4:
        from .test_qlora import to_nf4

        to_nf4(model, compute_dtype=torch.bfloat16)
    model = model.to("cuda")  # bitsandbytes quantizes on the move
    model.requires_grad_(False)
    apply_lora_to_linear_modules(model, PeftConfig(match_all_linear=True, dim=8, alpha=16, dropout=dropout,
                                                   use_dora=use_dora))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _train(model, graphed: bool, steps=6, micro=2, seed=0):
    """(losses, final adapter tensors) of AdamW steps over fixed batches, graphed or eager."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)

    def fn(ids):
        loss = model(input_ids=ids, labels=ids).loss
        return loss / micro, loss

    step = GraphedStep(fn, params) if graphed else None
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 301, (2, 96), generator=g).cuda() for _ in range(steps * micro)]
    losses = []
    for s in range(steps):
        total = 0.0
        for m in range(micro):
            ids = batches[s * micro + m]
            if step is not None:
                rep = step(ids)
            else:
                obj, rep = fn(ids)
                obj.backward()
            total += rep.item()
        losses.append(total)
        opt.step()
        opt.zero_grad(set_to_none=True)  # the graphed step must put its buffers back
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, step


@cuda
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_graphed_training_equals_eager_training(checkpointing):
    base = _tiny_lora_model(checkpointing=checkpointing)
    other = copy.deepcopy(base)
    eager_losses, eager_params, _ = _train(base, graphed=False)
    graph_losses, graph_params, step = _train(other, graphed=True)
    assert len(step.graphs) == 1 and not step.eager_reasons  # replayed from the third call on
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    for n, p in eager_params.items():
        torch.testing.assert_close(graph_params[n].float(), p.float(), rtol=1e-5, atol=1e-6, msg=n)


@cuda
@pytest.mark.parametrize("use_dora, nf4", [(True, False), (False, True), (True, True)], ids=["dora", "qlora", "qdora"])
def test_gpu_graphed_dora_and_4bit_training_equals_eager_training(use_dora, nf4):
    """The recipe's ``auto`` replays DoRA and QLoRA steps too: the norms (``||W||^2`` kept per weight, ``W A^T``
    per step), the magnitude's gradient and the 4-bit dequantize all replay as the eager step runs them."""
    base = _tiny_lora_model(use_dora=use_dora, nf4=nf4)
    other = copy.deepcopy(base)
    eager_losses, eager_params, _ = _train(base, graphed=False)
    graph_losses, graph_params, step = _train(other, graphed=True)
    assert len(step.graphs) == 1 and not step.eager_reasons
    assert any("lora_magnitude_vector" in n for n in eager_params) is use_dora
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-5, atol=0)
    for n, p in eager_params.items():
        torch.testing.assert_close(graph_params[n].float(), p.float(), rtol=1e-5, atol=1e-6, msg=n)


@cuda
def test_gpu_dropout_draws_new_masks_on_every_replay():
    model = _tiny_lora_model(dropout=0.3)
    params = [p for p in model.parameters() if p.requires_grad]
    step = GraphedStep(lambda ids: model(input_ids=ids, labels=ids).loss, params, warmup=1)
    ids = torch.randint(0, 301, (2, 64), device="cuda")
    losses = [step(ids).item() for _ in range(4)]  # warm-up, capture + replay, replay, replay
    assert len(step.graphs) == 1
    assert len(set(losses[1:])) == 3, f"replays repeated a dropout mask: {losses}"


@cuda
def test_gpu_a_host_sync_in_the_step_is_a_capture_error_or_an_eager_fallback():
    model = _tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]

    def syncing(ids):
        loss = model(input_ids=ids, labels=ids).loss
        if loss.item() > 1e9:  # a host read of a device value: not capturable
            raise AssertionError
        return loss

    ids = torch.randint(0, 301, (2, 64), device="cuda")
    step = GraphedStep(syncing, params, warmup=1)
    step(ids)
    with pytest.raises(GraphCaptureError, match="could not be captured"):
        step(ids)
    lenient = GraphedStep(syncing, params, warmup=1, fallback=True)
    for _ in range(3):
        assert torch.isfinite(lenient(ids))
    assert not lenient.graphs and len(lenient.eager_reasons) == 1


@cuda
def test_gpu_recipe_with_cuda_graphs_matches_the_eager_recipe(tmp_path):
    runs = {}
    for setting in (False, True):
        (tmp_path / str(setting)).mkdir()
        raw = tiny_raw_recipe(tmp_path / str(setting), train={"cuda_graphs": setting, "device": "cuda",
                                                               "grad_accum_steps": 2, "max_steps": 5})
        summary, log = run_recipe(raw)
        assert ("[cuda graphs] on" in log) is setting, log
        assert "run eagerly" not in log, log
        runs[setting] = step_losses(tmp_path / str(setting) / "out")
    assert runs[True].keys() == runs[False].keys()
    for s in runs[False]:
        assert runs[True][s] == pytest.approx(runs[False][s], rel=1e-5), (s, runs)


@cuda
def test_gpu_a_failed_capture_restores_the_stream_and_a_later_capture_works():
    model = _tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    calls = {"n": 0}

    def sometimes_syncing(ids):
        loss = model(input_ids=ids, labels=ids).loss
        calls["n"] += 1
        if ids.shape[1] == 64:
            loss.item()  # this signature cannot be captured
        return loss

    step = GraphedStep(sometimes_syncing, params, warmup=1, fallback=True)
    short, long = torch.randint(0, 301, (2, 64), device="cuda"), torch.randint(0, 301, (2, 80), device="cuda")
    default = torch.cuda.current_stream()
    for _ in range(3):
        step(short)
    assert torch.cuda.current_stream() == default and not step.graphs and len(step.eager_reasons) == 1
    for _ in range(3):
        step(long)
    assert len(step.graphs) == 1  # the pool of the failed capture was dropped; this one captured


@cuda
def test_gpu_a_trainable_tensor_missing_from_params_is_refused_at_the_capture():
    model = _tiny_lora_model()
    params = [p for p in model.parameters() if p.requires_grad]
    step = GraphedStep(lambda ids: model(input_ids=ids, labels=ids).loss, params[1:], warmup=1)
    ids = torch.randint(0, 301, (2, 64), device="cuda")
    step(ids)
    with pytest.raises(ValueError, match="1 trainable tensor.*not in params"):
        step(ids)


@cuda
def test_gpu_a_parameter_the_step_does_not_reach_keeps_a_none_grad_as_in_eager():
    model = _tiny_lora_model()
    spare = torch.nn.Parameter(torch.zeros(3, device="cuda"))  # trainable, never used by the step
    params = [p for p in model.parameters() if p.requires_grad] + [spare]
    step = GraphedStep(lambda ids: model(input_ids=ids, labels=ids).loss, params, warmup=1)
    ids = torch.randint(0, 301, (2, 64), device="cuda")
    for _ in range(3):
        step(ids)
        assert spare.grad is None  # AdamW skips a None grad; a zero one would still be decayed and moved
