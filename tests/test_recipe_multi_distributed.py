"""Several adapters (``data.adapters``) trained on two processes: ``torchrun --nproc-per-node 2`` with gloo, under
DDP and FSDP2, against the same multi-adapter run in one process with the same global batch (one process: batch 2
x 2 accumulation steps per adapter; two: batch 1 x 2 x 2 ranks). Each adapter's objective is its CE sum over
every rank divided by its global target count, so its gradient, its clipped norm and its logged loss are the
one-process run's. The same holds on a 4-bit (NF4) base under DDP, and for a two-process run stopped and resumed.

float32 tiny model on the CPU: the two runs add the same terms in other orders (each rank sums its half of the
batch, then the all-reduce / reduce-scatter adds the halves), so they differ by float32 roundings carried
through 6 steps of AdamW at lr 1e-2: 1e-5 relative on the logged losses and validation losses, and 1e-4 of each
tensor's largest value on the trained adapters, the bounds of the one-process mixed-versus-separate comparison
(``tests/test_recipe_multi.py``). A gradient averaged instead of summed over ranks, or reaching the wrong adapter,
moves them by O(1e-2) or more.
"""

from __future__ import annotations

import pytest

from .recipe_helpers import adapter_tensors, read_metrics, run_recipe, torchrun_recipe
from .test_recipe_multi import _data, _raw

pytestmark = pytest.mark.slow

STEPS = 6
LOSS_RTOL = 1e-5
ADAPTER_TOL = 1e-4  # of each tensor's largest value


def _recipe(tmp_path, out: str, batch_size: int, files: dict, **checkpoint) -> dict:
    raw = _raw(tmp_path, out, {"adapters": files}, batch_size=batch_size, eval_batch_size=2, eval_max_batches=3)
    raw["checkpoint"].update(checkpoint)
    return raw


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: both adapters in one process, batch 2 x 2 accumulation steps each."""
    tmp = tmp_path_factory.mktemp("multi_single")
    files = _data(tmp)
    summary, _ = run_recipe(_recipe(tmp, "run", 2, files))
    return tmp / "run", summary, files


def _assert_same_run(ref_dir, ref_summary, run_dir, summary, names, steps=range(1, STEPS + 1)):
    """Per-step losses (each adapter's and their mean), gradient norms, validation losses and final adapters of ``run_dir`` are
    those of ``ref_dir`` within the module docstring's tolerances."""
    ref = {r["step"]: r for r in read_metrics(ref_dir) if "loss" in r}
    got = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(got) == list(steps)
    for step in got:
        for key in ["loss", "grad_norm", *(f"loss/{n}" for n in names)]:
            assert got[step][key] == pytest.approx(ref[step][key], rel=LOSS_RTOL), (step, key)
    assert summary["val_loss_after"] == pytest.approx(ref_summary["val_loss_after"], rel=LOSS_RTOL)
    val_ref = [r for r in read_metrics(ref_dir) if "val_loss" in r][-1]
    val_got = [r for r in read_metrics(run_dir) if "val_loss" in r][-1]
    for n in names:
        assert val_got[f"val_loss/{n}"] == pytest.approx(val_ref[f"val_loss/{n}"], rel=LOSS_RTOL), n
    for n in names:
        want, have = adapter_tensors(ref_dir / "adapter" / n), adapter_tensors(run_dir / "adapter" / n)
        assert have.keys() == want.keys() and len(want) == 28
        assert any(float(t.abs().max()) > 1e-3 for k, t in want.items() if "lora_B" in k)  # the adapter trained
        for key, t in want.items():
            assert (have[key] - t).abs().max() <= ADAPTER_TOL * t.abs().max(), (n, key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_the_same_adapters_as_one(tmp_path, single_process, strategy):
    ref_dir, ref_summary, files = single_process
    summary, log0, log1 = torchrun_recipe(tmp_path, _recipe(tmp_path, "run", 1, files), strategy)
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    assert "x 2 adapters (alpha, beta)" in log0 and "(1 x 2 accum x 2 proc)" in log0
    assert "[done] adapter" in log0 and "[done]" not in log1
    _assert_same_run(ref_dir, ref_summary, tmp_path / "run", summary, list(files))


def test_a_two_process_multi_adapter_run_resumes_where_it_stopped(tmp_path, single_process):
    """Stopped after step 3 and resumed, under FSDP2 (sharded optimizer state gathered into the checkpoint and
    restored), both adapters end where the uninterrupted one-process run ends."""
    ref_dir, ref_summary, files = single_process
    raw = _recipe(tmp_path, "run", 1, files, save_every=3, resume="auto")
    raw["train"]["max_steps"] = 3
    torchrun_recipe(tmp_path, raw, "fsdp2")
    raw["train"]["max_steps"] = STEPS
    summary, log0, _ = torchrun_recipe(tmp_path, raw, "fsdp2")
    assert summary["resumed_from_step"] == 3 and "[resume]" in log0
    _assert_same_run(ref_dir, ref_summary, tmp_path / "run", summary, list(files))


def test_several_adapters_on_a_4bit_base_with_ddp_train_as_in_one_process(tmp_path):
    """NF4 bases are replicated (DDP); the mixed batches run through the quantized linears the same way."""
    pytest.importorskip("bitsandbytes")
    quant = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
    files = _data(tmp_path)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ref_summary, _ = run_recipe({**_recipe(tmp_path / "one", "run", 2, files), "quantization": quant})
    summary, log0, _ = torchrun_recipe(tmp_path / "two", {**_recipe(tmp_path / "two", "run", 1, files),
                                                          "quantization": quant}, "ddp")
    assert summary["world_size"] == 2 and "base 4-bit nf4" in log0
    _assert_same_run(tmp_path / "one" / "run", ref_summary, tmp_path / "two" / "run", summary, list(files))
