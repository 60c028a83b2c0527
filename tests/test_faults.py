"""The recipe under faults and bad input: nothing executed, nothing lost, nothing silently wrong.

Each test plays an attacker or an unlucky user (crafted pickles, kills mid-write, two runs at once,
exploding losses, damaged checkpoints, full or read-only disks) against the tiny CPU recipe and
checks the outcome a user sees: the exit code, the message, and the files left behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from automodel_lora.cli import finetune_main
from automodel_lora.recipe import loop as loop_module
from automodel_lora.recipe import train as train_module
from automodel_lora.recipe.progress import MetricsWriter

from .recipe_helpers import (
    SAFETENSORS_ENOSPC,
    DiskFull,
    adapter_tensors,
    deny_writes_under,
    read_metrics,
    run_recipe,
    step_losses,
    tiny_raw_recipe,
    write_text_data,
)

STEPS = 4


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in the recipe catches it."""


def _recipe(tmp_path, out: str = "out", train=None, checkpoint=None) -> dict:
    data = tmp_path / "data.jsonl"
    if not data.is_file():
        write_text_data(data, 24)
    return tiny_raw_recipe(
        tmp_path,
        data_file=data,
        train={"max_steps": STEPS, "eval_max_batches": 1, "log_every": 100, **(train or {})},
        checkpoint={"output_dir": str(tmp_path / out), "save_every": 2, "keep_last": 3, "resume": "auto", **(checkpoint or {})},
    )


def _cli(tmp_path, raw: dict, capsys) -> tuple[int, str]:
    """Run ``raw`` through the command line's entry point: (exit code, stderr)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    try:
        rc = finetune_main(["--config", str(path)])
    except SystemExit as e:  # TrainingStopped / TrainingInterrupted end the process with their code
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def _pt_files(ckpt) -> list:
    return sorted(ckpt.glob("*.pt"))


def _state_file(ckpt):
    return ckpt / "trainer_state.json" if (ckpt / "trainer_state.json").is_file() else ckpt / "trainer_state.pt"


def _optimizer_file(ckpt):
    return ckpt / "optimizer.pt" if (ckpt / "optimizer.pt").is_file() else ckpt / "trainer_state.pt"


def _assert_finite_checkpoint(ckpt) -> None:
    for key, t in adapter_tensors(ckpt / "adapter").items():
        assert torch.isfinite(t).all(), (ckpt, key)
    optim = torch.load(_optimizer_file(ckpt), weights_only=True)
    optim = optim.get("optimizer", optim)
    for name, slots in optim["state"].items():
        for slot, t in slots.items():
            assert torch.isfinite(t).all(), (ckpt, name, slot)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by the tests that damage it)."""
    tmp = tmp_path_factory.mktemp("finished")
    run_recipe(_recipe(tmp))
    return tmp


def _copy_run(finished_run, tmp_path):
    shutil.copy(finished_run / "data.jsonl", tmp_path / "data.jsonl")
    shutil.copytree(finished_run / "out", tmp_path / "out", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "out" / "checkpoints"


# ---------------------------------------------------------------------------------------- unsafe


class _Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_in_a_checkpoint_is_never_executed(tmp_path, finished_run, capsys):
    ckpts = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    for f in _pt_files(ckpts / "step_0000004"):
        torch.save({"state": _Payload(marker)}, f)

    # resume=auto: the crafted checkpoint is refused by name, the older intact one is used.
    try:
        rc, err = _cli(tmp_path, _recipe(tmp_path, train={"max_steps": 6}), capsys)
    finally:
        assert not marker.exists(), "unpickling the checkpoint ran code"
    assert rc == 0 and "skipping checkpoint" in err and "step_0000004" in err and "unsafe" in err, err
    assert "[resume] from" in err and "step_0000002 at step 2/6" in err

    # resume from that path: refused with exit code 2, naming the file.
    raw = _recipe(tmp_path, out="branch", checkpoint={"resume": str(ckpts / "step_0000004")})
    torch.save({"state": _Payload(marker)}, ckpts / "step_0000004" / "optimizer.pt")
    rc, err = _cli(tmp_path, raw, capsys)
    assert not marker.exists()
    assert rc == 2 and "step_0000004" in err and "unsafe to load" in err, err


# ---------------------------------------------------------------------------------------- data lost


def test_a_fresh_run_into_a_directory_with_checkpoints_refuses_and_overwrite_moves_it_aside(tmp_path, finished_run, capsys):
    ckpts = _copy_run(finished_run, tmp_path)
    before = sorted(p.name for p in ckpts.iterdir())
    raw = _recipe(tmp_path, checkpoint={"resume": None})
    rc, err = _cli(tmp_path, raw, capsys)
    assert rc == 2, err
    out = str(tmp_path / "out")
    for text in (out, "checkpoint.resume=auto", "checkpoint.output_dir", "checkpoint.overwrite=true"):
        assert text in err, (text, err)
    assert sorted(p.name for p in ckpts.iterdir()) == before

    raw["checkpoint"]["overwrite"] = True
    rc, err = _cli(tmp_path, raw, capsys)
    assert rc == 0, err
    (old,) = tmp_path.glob("out.old-*")  # the previous run, whole, under a timestamped name
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == before
    assert (old / "summary.json").is_file() and (old / "adapter").is_dir()
    assert sorted(step_losses(tmp_path / "out")) == list(range(1, STEPS + 1))


def test_rotation_deletes_only_checkpoints_of_the_current_run(tmp_path):
    from automodel_lora.recipe.checkpoint import CheckpointManager
    from automodel_lora.recipe.distributed import DistEnv

    root = tmp_path / "checkpoints"
    for step, run in [(1, "other"), (2, "mine"), (3, "mine"), (4, "other"), (5, "mine")]:
        (root / f"step_{step:07d}" / "adapter").mkdir(parents=True)
        (root / f"step_{step:07d}" / "trainer_state.json").write_text(json.dumps({"run_id": run, "step": step}))
    CheckpointManager(tmp_path, keep_last=1, env=DistEnv(), run_id="mine")._rotate(5)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000004", "step_0000005"]


def test_a_second_run_on_a_locked_directory_fails_at_once_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"f = open({str(out / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.truncate(0); f.write(f'pid {os.getpid()}'); f.flush(); print('locked', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = _cli(tmp_path, _recipe(tmp_path), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2 and f"pid {holder.pid}" in err and str(out) in err, err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_kill_during_rotation_leaves_no_partial_checkpoint_and_leftovers_are_cleaned(tmp_path, monkeypatch):
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):
        # Deletes the checkpoint's files but its adapter, then the process "dies".
        for f in sorted(os.listdir(path)):
            if f != "adapter" and os.path.isfile(os.path.join(path, f)):
                os.unlink(os.path.join(path, f))
        raise _Killed

    raw = _recipe(tmp_path, checkpoint={"save_every": 1, "keep_last": 1})
    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(_Killed):
        run_recipe(raw)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    ckpts = tmp_path / "out" / "checkpoints"
    steps = [p for p in ckpts.iterdir() if p.name.startswith("step_")]
    assert steps and all((p / "rng_rank0.pt").is_file() and _state_file(p).is_file() for p in steps), steps

    (ckpts / ".tmp-step_0000099").mkdir()  # a save killed before its rename, with a big file in it
    (ckpts / ".tmp-step_0000099" / "optimizer.pt").write_bytes(b"\0" * 2**20)
    summary, _ = run_recipe(raw)
    assert summary["resumed_from_step"] == 2
    leftovers = [p.name for d in (ckpts, tmp_path / "out") for p in d.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert leftovers == [] and sorted(p.name for p in ckpts.iterdir()) == ["step_0000004"]


def test_metrics_hold_one_record_per_step_after_restarts(tmp_path, monkeypatch):
    class _KilledAt(MetricsWriter):
        AT = 0

        def write(self, record):
            super().write(record)
            if record.get("step") == self.AT and "loss" in record:
                raise _Killed

    monkeypatch.setattr(train_module, "MetricsWriter", _KilledAt)
    raw = _recipe(tmp_path, checkpoint={"save_every": 2})
    monkeypatch.setattr(_KilledAt, "AT", 1)  # before the first checkpoint: the restart starts afresh
    with pytest.raises(_Killed):
        run_recipe(raw)
    monkeypatch.setattr(_KilledAt, "AT", 3)  # after the checkpoint of step 2: the resume truncates to it
    with pytest.raises(_Killed):
        run_recipe(raw)
    monkeypatch.setattr(_KilledAt, "AT", -1)
    summary, _ = run_recipe(raw)
    assert summary["resumed_from_step"] == 2
    records = read_metrics(tmp_path / "out")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "val_loss" in r] == [0, STEPS]


# ---------------------------------------------------------------------------------------- silently wrong


def _nan_loss_at(monkeypatch, steps: set[int]):
    """Training step ``s`` in ``steps`` (1-based) gets a NaN loss (and so NaN gradients)."""
    real = loop_module.causal_lm_loss_sum
    calls = {"n": 0}

    def loss(logits, labels):
        out = real(logits, labels)
        if torch.is_grad_enabled():  # a training micro-batch (evaluation runs under no_grad)
            calls["n"] += 1
            if calls["n"] in steps:
                return out * float("nan")
        return out

    monkeypatch.setattr(loop_module, "causal_lm_loss_sum", loss)


def test_a_nonfinite_step_is_skipped_counted_and_never_applied(tmp_path, monkeypatch):
    _nan_loss_at(monkeypatch, {2})
    summary, log = run_recipe(_recipe(tmp_path))
    assert summary["nonfinite_steps"] == 1 and "[nonfinite] step 2" in log
    rec = {r["step"]: r for r in read_metrics(tmp_path / "out") if "tokens" in r}
    assert rec[2]["skipped"] is True and rec[2]["loss"] is None and rec[3]["nonfinite_steps"] == 1
    assert all(r["loss"] is not None for s, r in rec.items() if s != 2)
    for ckpt in (tmp_path / "out" / "checkpoints").iterdir():
        _assert_finite_checkpoint(ckpt)


def test_nonfinite_stop_policy_names_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, {3})
    raw = _recipe(tmp_path, train={"nonfinite": "stop"})
    rc, err = _cli(tmp_path, raw, capsys)
    assert rc == 3, err
    assert "[stop] step 3" in err and f"last good checkpoint is {tmp_path / 'out' / 'checkpoints' / 'step_0000002'}" in err
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step_0000002"]


def test_a_diverging_lr_stops_with_a_message_and_leaves_only_finite_checkpoints(tmp_path, capsys):
    raw = _recipe(tmp_path, train={"lr": 1e6, "max_steps": 12, "max_nonfinite_skips": 2}, checkpoint={"save_every": 1})
    rc, err = _cli(tmp_path, raw, capsys)
    assert rc == 3 and "[stop] step" in err and "2 non-finite steps in a row" in err, err
    ckpts = sorted((tmp_path / "out" / "checkpoints").iterdir())
    assert f"last good checkpoint is {ckpts[-1]}" in err
    for ckpt in ckpts:
        _assert_finite_checkpoint(ckpt)


def test_a_nonfinite_adapter_is_never_saved(tmp_path, monkeypatch, capsys):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned_step(self, *args, **kwargs):  # the 3rd update leaves a NaN in an adapter
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    rc, err = _cli(tmp_path, _recipe(tmp_path, checkpoint={"save_every": 1}), capsys)
    ckpts = tmp_path / "out" / "checkpoints"
    assert rc == 3 and "step 3" in err and f"last good checkpoint is {ckpts / 'step_0000002'}" in err, err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000001", "step_0000002"]


# ---------------------------------------------------------------------------------------- unclear errors


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garbage(f):
    f.write_bytes(b"\x80\x04\x95garbage, not a checkpoint" * 20)


def _empty(f):
    f.write_bytes(b"")


def _missing_key(ckpt):
    f = _state_file(ckpt)
    if f.suffix == ".json":
        state = json.loads(f.read_text())
        del state["scheduler"]
        f.write_text(json.dumps(state))
    else:
        state = torch.load(f, weights_only=False)
        del state["scheduler"]
        torch.save(state, f)


def _bad_scheduler(ckpt):
    f = _state_file(ckpt)
    state = json.loads(f.read_text())
    state["scheduler"] = {}
    f.write_text(json.dumps(state))


def _wrong_optimizer_shapes(ckpt):
    f = _optimizer_file(ckpt)
    payload = torch.load(f, weights_only=False)
    optim = payload.get("optimizer", payload)
    slots = next(iter(optim["state"].values()))
    slots["exp_avg"] = torch.zeros(slots["exp_avg"].numel() + 1)
    slots["exp_avg_sq"] = torch.zeros(slots["exp_avg_sq"].numel() + 1)
    torch.save(payload, f)


DAMAGE = {
    "truncated": lambda c: _truncate(_optimizer_file(c)),
    "garbage": lambda c: _garbage(_optimizer_file(c)),
    "empty": lambda c: _empty(_optimizer_file(c)),
    "missing_key": _missing_key,
    "wrong_optimizer_shapes": _wrong_optimizer_shapes,
    "bad_scheduler": _bad_scheduler,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, finished_run, capsys, damage):
    ckpts = _copy_run(finished_run, tmp_path)
    DAMAGE[damage](ckpts / "step_0000004")
    rc, err = _cli(tmp_path, _recipe(tmp_path, train={"max_steps": 5}), capsys)
    assert rc == 0 and "warning: skipping checkpoint" in err and "step_0000004" in err, err
    assert "step_0000002 at step 2/5" in err


def test_a_damaged_checkpoint_named_by_path_fails_naming_the_file(tmp_path, finished_run, capsys):
    ckpts = _copy_run(finished_run, tmp_path)
    _wrong_optimizer_shapes(ckpts / "step_0000004")
    raw = _recipe(tmp_path, out="branch", checkpoint={"resume": str(ckpts / "step_0000004")})
    rc, err = _cli(tmp_path, raw, capsys)
    assert rc == 2 and str(_optimizer_file(ckpts / "step_0000004")) in err and "has shape" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_output_directory_fails_with_exit_code_2(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        rc, err = _cli(tmp_path, _recipe(tmp_path), capsys)
    finally:
        out.chmod(0o755)
    assert rc == 2 and str(out) in err and "not writable" in err, err


def test_an_optimizer_state_that_fails_to_load_falls_back_to_the_next_checkpoint(tmp_path, finished_run, monkeypatch, capsys):
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    real = dcp_state_dict.set_optimizer_state_dict
    calls = {"n": 0}

    def fails_once(*args, **kwargs):  # the first load (the newest checkpoint) fails after the model is wrapped
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("size mismatch in a param group")
        return real(*args, **kwargs)

    _copy_run(finished_run, tmp_path)
    monkeypatch.setattr(dcp_state_dict, "set_optimizer_state_dict", fails_once)
    rc, err = _cli(tmp_path, _recipe(tmp_path, train={"max_steps": 5}), capsys)
    assert rc == 0 and "warning: skipping checkpoint" in err and "size mismatch" in err, err
    assert "step_0000002 at step 2/5" in err


# ---------------------------------------------------------------------------------------- resume after a stop


def test_a_diverging_run_rerun_stops_every_time_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    raw = _recipe(tmp_path, train={"lr": 1e6, "max_steps": 12, "max_nonfinite_skips": 2}, checkpoint={"save_every": 1})
    out, lasts = tmp_path / "out", []
    for attempt in range(3):
        rc, err = _cli(tmp_path, raw, capsys)
        assert rc == 3 and "non-finite steps in a row" in err, (attempt, err)
        assert not (out / "summary.json").exists()
        last = sorted((out / "checkpoints").iterdir())[-1]
        lasts.append(last.name)
        _assert_finite_checkpoint(last)
        state = json.loads((last / "trainer_state.json").read_text())
        assert state["nonfinite_in_a_row"] == 0 and step_losses(out)[state["step"]] is not None, (attempt, state)
    assert lasts == lasts[:1] * 3, lasts


def test_a_run_whose_last_step_is_skipped_does_not_finish(tmp_path, monkeypatch, capsys):
    _nan_loss_at(monkeypatch, {STEPS})
    rc, err = _cli(tmp_path, _recipe(tmp_path), capsys)
    ckpts = tmp_path / "out" / "checkpoints"
    assert rc == 3 and f"step {STEPS}" in err and f"last good checkpoint is {ckpts / 'step_0000002'}" in err, err
    assert not (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "out" / "adapter").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]


def test_a_changed_lr_and_optimizer_settings_apply_on_resume(tmp_path, finished_run, capsys):
    from automodel_lora.recipe import RecipeConfig
    from automodel_lora.recipe.loop import lr_lambda

    ckpts = _copy_run(finished_run, tmp_path)
    raw = _recipe(tmp_path, train={"max_steps": 6, "lr": 1e-3, "weight_decay": 0.1, "eps": 1e-6})
    rc, err = _cli(tmp_path, raw, capsys)
    assert rc == 0 and "step_0000004 at step 4/6" in err, err
    assert "train.lr changed from 0.01 to 0.001" in err, err
    assert "train.weight_decay changed from 0 to 0.1" in err and "train.eps changed from 1e-08 to 1e-06" in err, err
    tc = RecipeConfig.from_dict(raw).train
    lrs = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "out") if "lr" in r}
    for step in (5, 6):  # the lr of step s is that of the schedule at s - 1, from the new peak
        assert lrs[step] == pytest.approx(1e-3 * lr_lambda(step - 1, 6, tc.warmup_steps, tc.scheduler, tc.min_lr_ratio))
    group = torch.load(ckpts / "step_0000006" / "optimizer.pt", weights_only=True)["param_groups"][0]
    assert (group["initial_lr"], group["weight_decay"], group["eps"]) == (1e-3, 0.1, 1e-6)


# ---------------------------------------------------------------------------------------- full disk


def _no_partial_checkpoint(out) -> None:
    ckpts = out / "checkpoints"
    left = [p.name for d in (out, ckpts) if d.is_dir() for p in d.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert left == [], left
    for ckpt in ckpts.glob("step_*"):  # whatever is there is whole
        _assert_finite_checkpoint(ckpt)
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == int(ckpt.name[5:])


@pytest.mark.parametrize(
    "file, code",
    [
        ("optimizer.pt", errno.ENOSPC),
        ("rng_rank0.pt", errno.ENOSPC),
        ("trainer_state.json", errno.ENOSPC),
        ("adapter_model.safetensors", errno.ENOSPC),
        ("optimizer.pt", errno.EACCES),
    ],
)
def test_a_failed_checkpoint_write_names_the_directory_and_leaves_no_partial_checkpoint(
    tmp_path, monkeypatch, capsys, file, code
):
    out = tmp_path / "out"
    DiskFull(monkeypatch, lambda p: "checkpoints" in p and os.path.basename(p).lstrip(".").startswith(file), 100, code)
    rc, err = _cli(tmp_path, _recipe(tmp_path), capsys)
    hint = "the disk is full" if code == errno.ENOSPC else "not writable"
    assert rc == 2 and os.strerror(code) in err and str(out / "checkpoints") in err and hint in err, err
    assert "no complete checkpoint was written yet" in err, err
    _no_partial_checkpoint(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == []


def test_a_full_disk_while_logging_metrics_stops_with_exit_code_2(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    DiskFull(monkeypatch, lambda p: p.endswith("metrics.jsonl"), budget=700)  # about three records
    rc, err = _cli(tmp_path, _recipe(tmp_path), capsys)
    assert rc == 2 and "could not write metrics.jsonl" in err and str(out) in err and "the disk is full" in err, err
    _no_partial_checkpoint(out)
    assert not (out / "summary.json").exists()


def test_a_full_disk_at_the_summary_stops_with_exit_code_2(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    DiskFull(monkeypatch, lambda p: "summary.json" in p)
    rc, err = _cli(tmp_path, _recipe(tmp_path), capsys)
    assert rc == 2 and "summary.json" in err and str(out) in err and "No space left" in err, err
    assert not (out / "summary.json").exists()
    _no_partial_checkpoint(out)


def test_torch_and_safetensors_write_errors_become_run_dir_errors(tmp_path):
    import safetensors

    from automodel_lora.recipe.errors import RunDirError
    from automodel_lora.recipe.files import writing

    errors = [  # what torch.save to a path and safetensors' save_file raise on a full disk
        RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
        ),
        safetensors.SafetensorError(SAFETENSORS_ENOSPC),
    ]
    for error in errors:
        (tmp_path / ".tmp-x").mkdir()
        with pytest.raises(RunDirError, match="could not write x in .*(No space left|file write failed)"):
            with writing("x", tmp_path, cleanup=tmp_path / ".tmp-x"):
                raise error
        assert not (tmp_path / ".tmp-x").exists()
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors are not disguised as disk errors
        with writing("x", tmp_path):
            raise RuntimeError("unrelated")


def test_a_truncated_adapter_file_is_never_committed_as_a_checkpoint(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    real = safetensors.torch.save_file

    def silently_short(tensors, filename, metadata=None):  # a writer that lost its last buffer on close
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) - 16)

    monkeypatch.setattr(safetensors.torch, "save_file", silently_short)
    rc, err = _cli(tmp_path, _recipe(tmp_path), capsys)
    out = tmp_path / "out"
    assert rc == 2 and "adapter_model.safetensors" in err and "incomplete" in err and str(out / "checkpoints") in err, err
    _no_partial_checkpoint(out)


# ---------------------------------------------------------------------------------------- not writable, as root too


def test_an_unwritable_output_directory_fails_with_exit_code_2_even_as_root(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    deny_writes_under(monkeypatch, out)
    rc, err = _cli(tmp_path, _recipe(tmp_path), capsys)
    assert rc == 2 and str(out) in err and "not writable" in err, err
    assert os.listdir(out) == []
