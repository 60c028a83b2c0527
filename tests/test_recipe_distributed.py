"""Multi-process training on the CPU: ``torchrun --nproc-per-node 2`` with gloo, FSDP2 and DDP.

Two processes with ``batch_size=1`` must train the same adapter as one process with
``batch_size=2`` (same global batch, same data order): the recipe scales each micro-batch loss
by the global target count, so the gradient is that of the same mean loss however the batch
is split. Only rank 0 writes the run's files.
"""

from __future__ import annotations

import shutil

import pytest

from .conftest import assert_close
from .recipe_helpers import adapter_tensors, read_metrics, run_recipe, step_losses, tiny_raw_recipe, torchrun_recipe

STEPS = 6


def _recipe(tmp_path, out: str, batch_size: int, **sections) -> dict:
    # Global batch 4 = batch_size x 2 accumulation steps x world size; evaluation in batches of 2
    # so both world sizes evaluate the same sequences.
    return tiny_raw_recipe(
        tmp_path,
        train={"max_steps": STEPS, "batch_size": batch_size, "grad_accum_steps": 2, "eval_batch_size": 2, "eval_max_batches": 3},
        checkpoint={"output_dir": str(tmp_path / out), "save_every": 3, "keep_last": 2, "resume": None},
        **sections,
    )


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, batch 2 x 2 accumulation steps."""
    tmp = tmp_path_factory.mktemp("single")
    summary, _ = run_recipe(_recipe(tmp, "run", batch_size=2))
    return tmp, summary


def _torchrun(tmp_path, strategy: str, **sections) -> tuple[dict, str, str]:
    """Run the recipe under ``torchrun --nproc-per-node 2`` (gloo); returns (summary, rank 0 log, rank 1 log)."""
    return torchrun_recipe(tmp_path, _recipe(tmp_path, "run", batch_size=1, **sections), strategy)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """``torchrun_run(strategy)`` -> (run dir parent, summary, rank 0 log, rank 1 log), run once per strategy."""
    runs = {}

    def get(strategy: str):
        if strategy not in runs:
            tmp = tmp_path_factory.mktemp(strategy)
            runs[strategy] = (tmp, *_torchrun(tmp, strategy))
        return runs[strategy]

    return get


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_train_the_same_adapter_as_one(single_process, torchrun_run, strategy):
    ref_dir, ref_summary = single_process
    tmp_path, summary, log0, log1 = torchrun_run(strategy)
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    assert f"strategy {strategy}" in log0 and "(1 x 2 accum x 2 proc)" in log0

    ref_losses, losses = step_losses(ref_dir / "run"), step_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    assert summary["val_loss_before"] == pytest.approx(ref_summary["val_loss_before"], rel=1e-5)
    assert summary["val_loss_after"] == pytest.approx(ref_summary["val_loss_after"], rel=1e-5)
    ref, got = adapter_tensors(ref_dir / "run" / "adapter"), adapter_tensors(tmp_path / "run" / "adapter")
    assert got.keys() == ref.keys() and len(ref) == 28
    assert any(float(t.abs().max()) > 1e-3 for k, t in ref.items() if "lora_B" in k)  # the adapter trained
    for key in ref:
        assert_close(got[key], ref[key], what=f"{strategy} {key}")

    # Only rank 0 writes: one record per step, one progress line per step, nothing from rank 1.
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, STEPS + 1))
    assert "[done] adapter" in log0 and f"step {STEPS}/{STEPS}" in log0
    assert not any(tag in log1 for tag in ("[data]", "[model]", "step 1/", "[done]")), log1
    # Each rank saves its own RNG in the (shared) checkpoint; the rest is rank 0's.
    last = tmp_path / "run" / "checkpoints" / f"step_{STEPS:07d}"
    assert sorted(p.name for p in last.iterdir()) == [
        "adapter",
        "optimizer.pt",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "trainer_state.json",
    ]


def test_fsdp2_checkpoint_resumes_in_one_process(tmp_path, single_process, torchrun_run):
    """The FSDP2 optimizer state is saved gathered (full tensors), so one process can continue it."""
    ref_dir, _ = single_process
    fsdp2_dir = torchrun_run("fsdp2")[0]
    shutil.copytree(fsdp2_dir / "run" / "checkpoints" / "step_0000003", tmp_path / "step_0000003")
    raw = _recipe(tmp_path, "continued", batch_size=2)
    raw["checkpoint"]["resume"] = str(tmp_path / "step_0000003")
    summary, log = run_recipe(raw)
    assert summary["resumed_from_step"] == 3 and "[resume] from" in log
    ref_losses, losses = step_losses(ref_dir / "run"), step_losses(tmp_path / "continued")
    assert sorted(losses) == [4, 5, 6]
    for step in losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    ref, got = adapter_tensors(ref_dir / "run" / "adapter"), adapter_tensors(tmp_path / "continued" / "adapter")
    for key in ref:
        assert_close(got[key], ref[key], what=key)


def test_qlora_with_ddp_on_two_processes_trains_the_same_adapter_as_one(tmp_path):
    """NF4 bases are not sharded (DDP replicates them); two processes must match one process."""
    pytest.importorskip("bitsandbytes")
    quant = {"quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run_recipe(_recipe(tmp_path / "one", "run", batch_size=2, **quant))
    summary, log0, _ = _torchrun(tmp_path / "two", "ddp", **quant)
    assert summary["world_size"] == 2 and "base 4-bit nf4" in log0
    ref_losses, losses = step_losses(tmp_path / "one" / "run"), step_losses(tmp_path / "two" / "run")
    assert sorted(losses) == sorted(ref_losses) == list(range(1, STEPS + 1))
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    ref, got = adapter_tensors(tmp_path / "one" / "run" / "adapter"), adapter_tensors(tmp_path / "two" / "run" / "adapter")
    assert got.keys() == ref.keys() and len(ref) == 28
    for key in ref:
        assert_close(got[key], ref[key], what=f"qlora ddp {key}")


def test_cleanup_frees_the_trained_model_before_destroying_the_group(tmp_path, monkeypatch):
    """A model kept alive only by reference cycles (as FSDP2 / DDP models are after a run) is freed by
    ``cleanup`` before the process group goes; left to interpreter shutdown it outlived the group and a
    rank could abort at exit."""
    import gc
    import weakref

    import torch
    import torch.distributed as dist

    from automodel_lora.recipe.distributed import DistEnv, cleanup

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    gc.disable()  # no automatic collection may free the cycle before cleanup does
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        model.keep = model  # a reference cycle, as the trained model's hooks and states make
        alive = weakref.ref(model)
        del model
        seen = []
        destroy = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group", lambda *a: (seen.append(alive() is None), destroy(*a)))
        cleanup(DistEnv())
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
    assert seen == [True], "the model must be gone when the process group is destroyed"


MOE = {"model_type": "qwen3_moe", "vocab_size": 259, "hidden_size": 32, "intermediate_size": 64,
       "moe_intermediate_size": 24, "num_experts": 5, "num_experts_per_tok": 2, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def test_fsdp2_shards_expert_adapters_and_trains_the_same_adapter_as_one_process(tmp_path):
    """LoRA on MoE experts under FSDP2: the (E, r, in) / (E, out, r) adapters are ordinary parameters."""
    moe = {"model": {"tiny": dict(MOE), "dtype": "float32"},
           "peft": {"match_all_linear": False, "target_modules": ["q_proj"], "match_all_experts": True, "dim": 4,
                    "alpha": 8}}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run_recipe(_recipe(tmp_path / "one", "run", batch_size=2, **moe))
    summary, log0, _ = _torchrun(tmp_path / "two", "fsdp2", **moe)
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp2"
    ref_losses, losses = step_losses(tmp_path / "one" / "run"), step_losses(tmp_path / "two" / "run")
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5), step
    ref, got = adapter_tensors(tmp_path / "one" / "run" / "adapter"), adapter_tensors(tmp_path / "two" / "run" / "adapter")
    assert got.keys() == ref.keys() and sum("experts" in k for k in ref) == 8
    assert any(float(t.abs().max()) > 1e-3 for k, t in ref.items() if "experts" in k and "lora_B" in k)
    for key in ref:
        assert_close(got[key], ref[key], what=f"moe fsdp2 {key}")
