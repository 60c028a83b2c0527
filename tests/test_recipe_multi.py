"""Several adapters trained in one recipe run (``data.adapters``), every batch mixing them: each adapter
ends where a run of its own (same seed, settings, data order) ends, its losses are that run's, it is saved
in PEFT format in ``adapter/<name>/``, and a resumed run ends where an uninterrupted one does.

float32 tiny model on the CPU: the mixed run and the separate runs compute the same sums in other orders
(the mixed batch stacks the adapters; the loss is a sum of per-adapter terms), so they differ by float32
roundings carried through the steps: 1e-5 relative on losses, 1e-4 of each tensor's largest value on the
trained adapters (lr 1e-2, 6 steps). A gradient reaching the wrong adapter moves them by O(1)."""

from __future__ import annotations

import json

import pytest
import torch

from automodel_lora.recipe.errors import ConfigError

from .recipe_helpers import adapter_tensors, read_metrics, run_recipe, step_losses, tiny_raw_recipe, write_text_data


def _data(tmp_path):
    a = write_text_data(tmp_path / "a.jsonl", n_records=120)
    b = tmp_path / "b.jsonl"  # other text: the two adapters must learn different things
    b.write_text("".join(json.dumps({"text": f"item {i}: " + "xyz " * (i % 7 + 3)}) + "\n" for i in range(150)))
    return {"alpha": str(a), "beta": str(b)}


def _losses(metrics: list[dict], name: str) -> dict[int, float]:
    """{step: adapter ``name``'s training loss} from a multi-adapter run's metrics records."""
    return {r["step"]: r[f"loss/{name}"] for r in metrics if f"loss/{name}" in r}


def _raw(tmp_path, out: str, data: dict, peft: dict | None = None, **train):
    raw = tiny_raw_recipe(tmp_path, train={"max_steps": 6, "grad_accum_steps": 2, "batch_size": 2, **train},
                          checkpoint={"output_dir": str(tmp_path / out), "save_every": 0, "resume": None},
                          peft=peft or {})
    raw["data"].pop("path")
    raw["data"].update(data)
    return raw


@pytest.mark.parametrize("peft", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "lora_bias"])
def test_each_adapter_trains_as_a_run_of_its_own(tmp_path, peft):
    """Plain, DoRA (the magnitudes trained and saved too) and ``lora_bias`` adapters alike."""
    files = _data(tmp_path)
    summary, log = run_recipe(_raw(tmp_path, "multi", {"adapters": files}, peft))
    assert "x 2 adapters (alpha, beta)" in log and "[data] adapter beta:" in log
    multi = read_metrics(tmp_path / "multi")
    for name, path in files.items():
        run_recipe(_raw(tmp_path, name, {"path": path}, peft))
        alone = step_losses(tmp_path / name)
        mixed = _losses(multi, name)
        assert mixed.keys() == alone.keys() == set(range(1, 7))
        for step in alone:
            assert mixed[step] == pytest.approx(alone[step], rel=1e-5), (name, step)
        want = adapter_tensors(tmp_path / name / "adapter")
        got = adapter_tensors(tmp_path / "multi" / "adapter" / name)
        assert got.keys() == want.keys()
        assert any("lora_magnitude_vector" in k for k in want) is bool(peft.get("use_dora"))
        assert any("lora_B.bias" in k for k in want) is bool(peft.get("lora_bias"))
        for key, t in want.items():
            assert (got[key] - t).abs().max() <= 1e-4 * t.abs().max(), (name, key)
    a, b = adapter_tensors(tmp_path / "alpha" / "adapter"), adapter_tensors(tmp_path / "beta" / "adapter")
    assert any((a[k] - b[k]).abs().max() > 1e-2 for k in a if "lora_B" in k)  # the two runs differ
    assert {f"val_loss/{n}" for n in files} <= set(multi[-1])


def test_a_resumed_multi_adapter_run_ends_where_an_uninterrupted_one_does(tmp_path):
    files = _data(tmp_path)
    run_recipe(_raw(tmp_path, "straight", {"adapters": files}))
    raw = _raw(tmp_path, "resumed", {"adapters": files}, max_steps=3)
    raw["checkpoint"].update(save_every=3, resume="auto")
    run_recipe(raw)
    raw["train"]["max_steps"] = 6
    summary, log = run_recipe(raw)
    assert "[resume]" in log and summary["resumed_from_step"] == 3
    for name in files:
        want = adapter_tensors(tmp_path / "straight" / "adapter" / name)
        got = adapter_tensors(tmp_path / "resumed" / "adapter" / name)
        for key, t in want.items():
            assert (got[key] - t).abs().max() <= 1e-4 * t.abs().max(), (name, key)


@pytest.mark.parametrize("change, message", [
    ({"train": {"max_steps": None, "epochs": 1}}, "set `train.max_steps`"),
    ({"peft": {"dropout": 0.1}}, "mixed batches train without dropout"),
    ({"data": {"path": "x.jsonl"}}, "`data.path` and `data.adapters` both set"),
    ({"data": {"adapters": {"bad.name": "x.jsonl"}}}, "cannot name an adapter"),
    ({"data": {"adapters": {"default": "x.jsonl"}}}, "'default' is the name of a plain run's adapter"),
    ({"train": {"compile": True}}, "mixed batches run eagerly"),
])
def test_what_a_multi_adapter_run_refuses_is_named(tmp_path, change, message):
    raw = _raw(tmp_path, "out", {"adapters": _data(tmp_path)})
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(ConfigError, match=message):
        run_recipe(raw)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("checkpoints/*"))


def test_one_named_adapter_is_saved_in_its_own_directory_too(tmp_path):
    files = _data(tmp_path)
    run_recipe(_raw(tmp_path, "one", {"adapters": {"alpha": files["alpha"]}}, max_steps=2))
    assert (tmp_path / "one" / "adapter" / "alpha" / "adapter_config.json").is_file()
    assert not (tmp_path / "one" / "adapter" / "adapter_config.json").exists()


def test_the_replayed_mixed_step_keeps_one_block_and_matches_the_eager_run(tmp_path, monkeypatch):
    """``train.cuda_graphs`` with ``data.adapters`` (``graphs.MixedStep``), its plumbing on the CPU: graphs are
    forced on, so every capture fails (no CUDA) and the step falls back to eager calls of the same function. The
    run equals the plain multi-adapter run to float32 rounding (1e-5; SDPA's causal path instead of a mask is
    the only change), the block is built once for the run and off the model between steps (evaluation and the
    saves run on the class forwards)."""
    from automodel_lora.lora import lora_modules
    from automodel_lora.recipe import graphs, setup_phase

    files = _data(tmp_path)
    run_recipe(_raw(tmp_path, "eager", {"adapters": files}, eval_every=3))
    made, installed_between_steps = [], []
    real_end_step = graphs.MixedStep.end_step

    def end_step(self):
        made.append((self.block, {k: t.data_ptr() for k, t in self.block.rows._cache.items()}))
        real_end_step(self)
        installed_between_steps.append(any("forward" in m.__dict__ for _, m in lora_modules(self.model)))

    monkeypatch.setattr(graphs.MixedStep, "end_step", end_step)
    monkeypatch.setattr(setup_phase, "use_cuda_graphs", lambda *a, **k: (True, "on (forced)"))
    summary, log = run_recipe(_raw(tmp_path, "replayed", {"adapters": files}, eval_every=3, cuda_graphs="auto"))
    assert "run eagerly" in log and "not on a CUDA device" in log  # the captures failed, the steps ran eagerly
    # one block for the run, its row tensors (what a graph reads) the same ones from the first step on
    assert len(made) == 6 and all(b is made[0][0] and rows == made[0][1] for b, rows in made) and made[0][1]
    assert not any(installed_between_steps)
    eager, replayed = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "replayed")
    for name in files:
        want = _losses(eager, name)
        got = _losses(replayed, name)
        assert got.keys() == want.keys() == set(range(1, 7))
        assert all(got[k] == pytest.approx(want[k], rel=1e-5) for k in want), (name, got, want)
        a, b = adapter_tensors(tmp_path / "eager" / "adapter" / name), adapter_tensors(tmp_path / "replayed" / "adapter" / name)
        assert all((b[k] - t).abs().max() <= 1e-4 * t.abs().max() for k, t in a.items()), name


def test_a_changed_composition_is_refused_and_end_step_puts_the_model_back(tmp_path):
    """A micro-batch of another composition, within a step (the block installed), is refused; ``end_step`` (the
    ``finally`` of the recipe's step) then takes the block off and puts back the trainable flags it changed."""
    from automodel_lora.recipe.graphs import MixedStep

    from .test_adapter_batch import _model_with_adapters

    model = _model_with_adapters().float().train()  # adapters "default", "b", "c"
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    b_param = model.model.layers[0].self_attn.q_proj.lora_inactive["b"].lora_A.weight
    b_param.requires_grad_(False)  # the block makes it trainable while installed
    step = MixedStep(model, model, [p for p in params if p.requires_grad], bf16=False, fallback=True)
    ids = torch.randint(0, 128, (3, 8))
    scale = torch.ones(2)
    step(["default", "default", "b"], {"default": slice(0, 2), "b": slice(2, 3)}, ids, ids, scale)
    assert b_param.requires_grad and any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="the replay needs one composition"):
        step(["default", "b", "b"], {"default": slice(0, 1), "b": slice(1, 3)}, ids, ids, scale)
    step.end_step()
    assert not any("forward" in m.__dict__ for m in model.modules()) and not b_param.requires_grad


def test_multi_train_step_ends_the_replayed_step_when_a_micro_batch_raises(monkeypatch):
    from automodel_lora.recipe import multi_adapter

    ended = []

    class Raising:
        def __call__(self, *args):
            raise RuntimeError("boom")

        def end_step(self):
            ended.append(True)

    class Recipe:
        graphed = Raising()

    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long),
             "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    monkeypatch.setattr(multi_adapter, "mixed_micro_batches", lambda recipe, step: [(batch, ["a"], {"a": slice(0, 1)})])
    monkeypatch.setattr(multi_adapter, "global_counts", lambda values, env: [1.0, 1.0])
    monkeypatch.setattr(multi_adapter, "graph_inputs", lambda batch, scale, device: ())
    recipe = Recipe()
    recipe.env = type("Env", (), {"world_size": 1, "device": torch.device("cpu")})()
    recipe.adapter_data = {"a": None}
    with pytest.raises(RuntimeError, match="boom"):
        multi_adapter.multi_train_step(recipe, 1)
    assert ended == [True]


def test_auto_replays_mixed_batches_where_it_replays_one_adapter():
    """``data.adapters`` changes nothing in the choice: the same blockers and the same width limit."""
    from automodel_lora.recipe.graphs import AUTO_MAX_HIDDEN, use_cuda_graphs
    from automodel_lora.recipe.sections import DataConfig, TrainConfig

    from .test_graphed_step import _Env

    for data in (dict(path="a.jsonl"), dict(adapters={"a": "a.jsonl", "b": "b.jsonl"})):
        for hidden, want in ((896, True), (AUTO_MAX_HIDDEN + 1, False)):
            on, why = use_cuda_graphs(_Env(), TrainConfig(max_steps=1), DataConfig(**data), fused_loss=False,
                                      hidden=hidden)
            assert on is want, (data, hidden, why)
        on, why = use_cuda_graphs(_Env(), TrainConfig(max_steps=1), DataConfig(**data, packing=False),
                                  fused_loss=False, hidden=896)
        assert not on and "data.packing is off" in why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("peft", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "lora_bias"])
def test_gpu_replayed_mixed_batches_match_the_eager_multi_adapter_run(tmp_path, peft):
    files = _data(tmp_path)
    losses = {}
    for setting in (False, True):
        summary, log = run_recipe(_raw(tmp_path, str(setting), {"adapters": files}, peft, cuda_graphs=setting,
                                       device="cuda", eval_every=3))
        assert ("[cuda graphs] on" in log) is setting and "run eagerly" not in log, log
        losses[setting] = read_metrics(tmp_path / str(setting))
    for name in files:
        want = _losses(losses[False], name)
        got = _losses(losses[True], name)
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-4) for k in want)
        a = adapter_tensors(tmp_path / "False" / "adapter" / name)
        b = adapter_tensors(tmp_path / "True" / "adapter" / name)
        assert all((b[k] - t).abs().max() <= 1e-3 * t.abs().max() for k, t in a.items()), name

