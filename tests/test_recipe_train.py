"""The finetune recipe end to end on the CPU: quickstart, files, resume, signals, QLoRA, bad input, PEFT."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

import automodel_lora as al
from automodel_lora.recipe import RecipeConfig, TrainingInterrupted, finetune, load_recipe
from automodel_lora.recipe import train as train_module
from automodel_lora.recipe.checkpoint import CheckpointManager
from automodel_lora.recipe.config import ConfigError
from automodel_lora.recipe.data import IGNORE_INDEX, StepSampler, build_datasets, collate, eval_batches
from automodel_lora.recipe.distributed import DistEnv
from automodel_lora.recipe.files import clean_stale
from automodel_lora.recipe.model import prepare_model
from automodel_lora.recipe.progress import MetricsWriter
from automodel_lora.recipe.tokenizer import ByteTokenizer

from .conftest import assert_close
from .recipe_helpers import (
    QUICKSTART,
    REPO,
    TINY_MODEL,
    adapter_tensors,
    read_metrics,
    run_recipe,
    step_losses,
    tiny_raw_recipe,
    write_prompt_completion_data,
    write_text_data,
)

# ---------------------------------------------------------------------------------------- quickstart

QUICK_STEPS = 60
QUICK_OVERRIDES = [
    f"train.max_steps={QUICK_STEPS}",
    "data.seq_len=128",
    "train.warmup_steps=5",
    "train.eval_every=30",
    "train.eval_max_batches=8",
    "train.log_every=20",
    "checkpoint.save_every=20",
    "checkpoint.keep_last=2",
    "checkpoint.resume=null",
]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """configs/quickstart.yaml with 60 steps of 128 tokens instead of 300 of 256 (~10 s)."""
    out = tmp_path_factory.mktemp("quickstart") / "run"
    cfg = load_recipe(QUICKSTART, [*QUICK_OVERRIDES, f"checkpoint.output_dir={out}"])
    log = io.StringIO()
    summary = finetune(cfg, stream=log)
    return cfg, summary, log.getvalue(), out


def test_quickstart_loss_falls_and_beats_the_untrained_model(quickstart_run):
    _, summary, log, out = quickstart_run
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, QUICK_STEPS + 1))
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(QUICK_STEPS - 4, QUICK_STEPS + 1)]
    # A random base on 259 byte ids starts near ln(259) = 5.56; 60 LoRA steps reach ~4.4.
    assert abs(losses[1] - math.log(259)) < 0.15
    assert sum(last) / 5 < sum(first) / 5 - 0.8, (first, last)
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.5, summary
    assert summary["steps"] == QUICK_STEPS and summary["first_loss"] == losses[1] and summary["last_loss"] == losses[QUICK_STEPS]
    assert f"step {QUICK_STEPS}/{QUICK_STEPS}" in log and "tok/s" in log and "[done] val loss" in log


def test_quickstart_writes_adapter_metrics_checkpoints_summary(quickstart_run):
    cfg, summary, _, out = quickstart_run
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "base_model" / "config.json").is_file()
    assert json.loads((out / "summary.json").read_text()) == summary
    assert yaml.safe_load((out / "config.yaml").read_text()) == cfg.to_dict()
    records = read_metrics(out)
    val_steps = [r["step"] for r in records if "val_loss" in r]
    assert val_steps == [0, 30, 60]
    train_records = [r for r in records if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["grad_norm"]) for r in train_records)
    # lr: linear warmup over 5 steps, then cosine to 10% of 3e-3 (the value logged is the one each step used).
    lrs = {r["step"]: r["lr"] for r in train_records}
    assert lrs[1] == pytest.approx(3e-3 / 6) and lrs[6] == pytest.approx(3e-3)
    assert lrs[QUICK_STEPS] == pytest.approx(3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 54 / 55))))
    # save_every=20, keep_last=2: step 20 rotated out, nothing half-written left behind.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000040", "step_0000060"]
    last = out / "checkpoints" / "step_0000060"
    assert {p.name for p in last.iterdir()} == {"adapter", "trainer_state.json", "optimizer.pt", "rng_rank0.pt"}
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == QUICK_STEPS and state["scheduler"]["last_epoch"] == QUICK_STEPS
    optimizer = torch.load(last / "optimizer.pt", weights_only=True)  # tensors and plain values only
    assert len(optimizer["state"]) == 2 * 28  # lora_A and lora_B of 28 linears
    final, saved = adapter_tensors(out / "adapter"), adapter_tensors(last / "adapter")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def test_saved_adapter_loads_in_peft_and_reproduces_the_recipe_validation_loss(quickstart_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, summary, _, out = quickstart_run
    base = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(out / "base_model"))
    assert al.load_adapter(ours, str(out / "adapter")) == 28
    plain = AutoModelForCausalLM.from_pretrained(str(out / "base_model")).eval()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_peft, logits_ours, logits_base = peft_model(ids).logits, ours.eval()(ids).logits, plain(ids).logits
    assert_close(logits_peft, logits_ours, what="PEFT vs automodel_lora logits")
    assert (logits_peft - logits_base).abs().max() > 0.5  # the adapter is not a no-op
    # The model PEFT loads is the one the recipe evaluated: same validation loss.
    _, val, _ = build_datasets(cfg.data, ByteTokenizer(), cfg.train.seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for examples in eval_batches(val, cfg.train.batch_size, cfg.train.eval_max_batches):
            b = collate(examples, ByteTokenizer.pad_token_id)
            logits = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
            )
            n += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert total / n == pytest.approx(summary["val_loss_after"], rel=1e-5)


# ---------------------------------------------------------------------------------------- resume


class _SignalAtStep(MetricsWriter):
    """Sends this process ``SIGNUM`` right after the training record of step ``AT`` is written."""

    AT, SIGNUM = 0, signal.SIGTERM

    def write(self, record: dict) -> None:
        super().write(record)
        if record.get("step") == self.AT and "loss" in record:
            os.kill(os.getpid(), self.SIGNUM)


def _resume_recipe(tmp_path, out_name: str) -> dict:
    # 12 records -> ~50 sequences of 64 -> 12 steps per epoch: 16 steps cross an epoch boundary.
    # Dropout and grad accumulation make the RNG restore and the data position matter.
    data = write_text_data(tmp_path / "data.jsonl", 12)
    return tiny_raw_recipe(
        tmp_path,
        data_file=data,
        peft={"dropout": 0.1},
        train={"max_steps": 16, "batch_size": 2, "grad_accum_steps": 2, "eval_every": 5},
        checkpoint={"output_dir": str(tmp_path / out_name), "save_every": 4, "resume": "auto", "keep_last": 5},
    )


def test_resume_after_sigterm_continues_exactly(tmp_path, monkeypatch):
    full, _ = run_recipe(_resume_recipe(tmp_path, "full"))
    reference = step_losses(tmp_path / "full")

    # Interrupted at step 7 (between the checkpoints of steps 4 and 8): SIGTERM saves step 7.
    monkeypatch.setattr(_SignalAtStep, "AT", 7)
    monkeypatch.setattr(train_module, "MetricsWriter", _SignalAtStep)
    with pytest.raises(TrainingInterrupted) as info:
        run_recipe(_resume_recipe(tmp_path, "resumed"))
    assert info.value.code == 128 + signal.SIGTERM
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000004", "step_0000007"]
    assert max(step_losses(tmp_path / "resumed")) == 7
    monkeypatch.undo()

    resumed, log = run_recipe(_resume_recipe(tmp_path, "resumed"))
    assert "[resume] from" in log and resumed["resumed_from_step"] == 7
    again = step_losses(tmp_path / "resumed")
    assert sorted(again) == list(range(1, 17))  # each step logged once
    for step in range(1, 17):
        assert again[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    val = [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "resumed") if "val_loss" in r]
    val_ref = [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "full") if "val_loss" in r]
    assert [s for s, _ in val] == [s for s, _ in val_ref] == [0, 5, 10, 15, 16]
    assert [v for _, v in val] == pytest.approx([v for _, v in val_ref], rel=1e-6)
    assert resumed["first_loss"] == full["first_loss"] and resumed["val_loss_after"] == pytest.approx(
        full["val_loss_after"], rel=1e-6
    )
    a = adapter_tensors(tmp_path / "full" / "adapter")
    b = adapter_tensors(tmp_path / "resumed" / "adapter")
    for key in a:
        assert_close(b[key], a[key], what=key)

    # Running the finished recipe again trains nothing and returns the same summary.
    assert run_recipe(_resume_recipe(tmp_path, "resumed"))[0] == json.loads((tmp_path / "resumed" / "summary.json").read_text())


def test_resume_from_an_explicit_checkpoint_path(tmp_path):
    run_recipe(_resume_recipe(tmp_path, "full"))
    reference = step_losses(tmp_path / "full")
    raw = _resume_recipe(tmp_path, "branch")
    raw["checkpoint"]["resume"] = str(tmp_path / "full" / "checkpoints" / "step_0000008")
    summary, _ = run_recipe(raw)
    assert summary["resumed_from_step"] == 8
    branch = step_losses(tmp_path / "branch")
    assert sorted(branch) == list(range(9, 17))
    for step in branch:
        assert branch[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step


def test_incomplete_checkpoints_are_ignored_and_cleaned_up(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_0000009").mkdir(parents=True)  # a save that crashed before its rename
    (root / ".trash-step_0000001-1").mkdir(parents=True)  # a rotation killed mid-delete
    (root / "step_0000005" / "adapter").mkdir(parents=True)  # no trainer_state.json: not a checkpoint
    (root / "step_0000003" / "adapter").mkdir(parents=True)
    (root / "step_0000003" / "trainer_state.json").write_text("{}")
    manager = CheckpointManager(tmp_path, keep_last=1, env=DistEnv())
    assert manager.latest() == root / "step_0000003"
    assert manager.candidates("auto") == [root / "step_0000005", root / "step_0000003"]  # read() decides
    assert manager.candidates(None) == []
    with pytest.raises(ConfigError, match="`checkpoint.resume`: .* is not a checkpoint directory"):
        manager.candidates(str(root / "step_0000005"))
    assert sorted(p.name for p in clean_stale(root)) == [".tmp-step_0000009", ".trash-step_0000001-1"]
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000005"]


def test_ctrl_c_in_a_real_process_saves_a_checkpoint(tmp_path):
    raw = tiny_raw_recipe(tmp_path, train={"max_steps": 100_000, "log_every": 1})
    raw["checkpoint"]["output_dir"] = str(tmp_path / "out")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "finetune.py"), "--config", str(tmp_path / "r.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err
    last_step = max(step_losses(tmp_path / "out"))
    assert 3 <= last_step < 100_000
    assert f"[SIGINT] checkpoint saved at step {last_step}" in err
    assert CheckpointManager(tmp_path / "out", 2, DistEnv()).latest().name == f"step_{last_step:07d}"


# ---------------------------------------------------------------------------------------- QLoRA


def test_qlora_prepare_model_quantizes_every_linear_but_the_head(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    raw = tiny_raw_recipe(tmp_path, quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"})
    torch.manual_seed(0)
    model, description = prepare_model(RecipeConfig.from_dict(raw), torch.device("cpu"))
    raw["quantization"]["load_in_4bit"] = False
    torch.manual_seed(0)
    dense, _ = prepare_model(RecipeConfig.from_dict(raw), torch.device("cpu"))
    assert "base 4-bit nf4" in description
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and all(isinstance(model.get_submodule(n), al.LinearLoRA) for n in quantized)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed 4-bit
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        q, d = model.eval()(ids).logits, dense.eval()(ids).logits
    err = float((q - d).norm() / d.norm())
    assert 1e-4 < err < 0.2, err  # NF4 rounding: close to the dense model, not equal to it


def test_qlora_recipe_trains_on_the_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    raw = tiny_raw_recipe(
        tmp_path,
        quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
        train={"max_steps": 10},
    )
    summary, log = run_recipe(raw)
    assert "base 4-bit nf4 (compute float32)" in log and summary["strategy"] == "none"
    losses = step_losses(tmp_path / "out")
    assert losses[10] < losses[1] - 0.1, losses
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.1
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------- bad input


def _assert_fails_before_training(raw: dict, message: str):
    with pytest.raises(ConfigError) as info:
        run_recipe(raw)
    assert message in str(info.value)
    out = raw["checkpoint"]["output_dir"]
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")) and not os.path.exists(os.path.join(out, "checkpoints"))


def test_missing_data_file(tmp_path):
    raw = tiny_raw_recipe(tmp_path, data={"path": str(tmp_path / "nope.jsonl")})
    _assert_fails_before_training(raw, f"`data.path`: file not found: {tmp_path / 'nope.jsonl'}")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset(tmp_path, content):
    (tmp_path / "empty.jsonl").write_text(content)
    raw = tiny_raw_recipe(tmp_path, data={"path": str(tmp_path / "empty.jsonl")})
    _assert_fails_before_training(raw, "`data.path`: dataset is empty")


def test_invalid_json_line_names_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    raw = tiny_raw_recipe(tmp_path, data={"path": str(tmp_path / "bad.jsonl")})
    _assert_fails_before_training(raw, f"{tmp_path / 'bad.jsonl'}:2: not valid JSON")


def test_seq_len_longer_than_the_model_supports(tmp_path):
    raw = tiny_raw_recipe(tmp_path, data={"seq_len": 256})
    _assert_fails_before_training(
        raw, "`data.seq_len: 256` is larger than the model's max_position_embeddings (128); set data.seq_len <= 128"
    )


def test_target_modules_matching_nothing(tmp_path):
    raw = tiny_raw_recipe(tmp_path, peft={"match_all_linear": False, "target_modules": ["query_key_value"]})
    _assert_fails_before_training(raw, "[peft] PeftConfig.target_modules entry 'query_key_value' matches no linear module")


def test_tokenizer_larger_than_the_model_vocab(tmp_path):
    raw = tiny_raw_recipe(tmp_path)
    raw["model"]["tiny"]["vocab_size"] = 200
    _assert_fails_before_training(raw, "the tokenizer (byte) has 259 tokens but the model's vocab_size is 200")


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    from automodel_lora.cli import finetune_main

    raw = tiny_raw_recipe(tmp_path, data={"path": str(tmp_path / "nope.jsonl")})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert finetune_main(["--config", str(tmp_path / "r.yaml")], prog="finetune.py") == 2
    assert "finetune.py: error: `data.path`: file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- data formats, checkpointing


def test_prompt_completion_recipe_puts_the_loss_on_completions_only(tmp_path):
    data = write_prompt_completion_data(tmp_path / "pc.jsonl", 64)
    raw = tiny_raw_recipe(tmp_path, data_file=data, data={"packing": False, "validation_split": 0.0}, train={"max_steps": 3})
    summary, log = run_recipe(raw)
    assert "[data] 64 train records -> 64 sequences" in log and "padded" in log
    assert summary["val_loss_before"] is None
    # Reference for step 1: the same initial model and first batch through transformers' own loss,
    # with -100 on the prompt tokens (the recipe seeds with train.seed before building the model).
    cfg = RecipeConfig.from_dict(raw)
    torch.manual_seed(cfg.train.seed)
    model, _ = prepare_model(cfg, torch.device("cpu"))
    train, _, _ = build_datasets(cfg.data, ByteTokenizer(), cfg.train.seed)
    (first,) = StepSampler(len(train), cfg.train.batch_size, 1, 1, cfg.train.seed).micro_batches(0, 0)
    b = collate([train[i] for i in first], ByteTokenizer.pad_token_id)
    with torch.no_grad():
        reference = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        every_token = b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE_INDEX)
        unmasked = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=every_token).loss
    loss_step1 = step_losses(tmp_path / "out")[1]
    assert loss_step1 == pytest.approx(float(reference), rel=1e-5)
    assert abs(loss_step1 - float(unmasked)) > 1e-3


def test_gradient_checkpointing_recomputes_and_matches_the_plain_gradients(tmp_path):
    raw = tiny_raw_recipe(tmp_path, model={"gradient_checkpointing": True})
    torch.manual_seed(0)
    ckpt_model, description = prepare_model(RecipeConfig.from_dict(raw), torch.device("cpu"))
    raw["model"]["gradient_checkpointing"] = False
    torch.manual_seed(0)
    plain_model, _ = prepare_model(RecipeConfig.from_dict(raw), torch.device("cpu"))
    assert "gradient checkpointing on" in description and ckpt_model.model.layers[0].gradient_checkpointing
    with torch.no_grad():  # a non-zero lora_B, so every adapter gradient is non-trivial
        for m in (ckpt_model, plain_model):
            for _, mod in al.lora_modules(m):
                mod.lora_B.weight.copy_(torch.linspace(-0.1, 0.1, mod.lora_B.weight.numel()).view_as(mod.lora_B.weight))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    grads, calls = [], []
    for m in (ckpt_model, plain_model):
        count = [0]
        # A pre-hook: the recompute stops early, after the layer's last saved tensor, before forward hooks run.
        m.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda *_, c=count: c.__setitem__(0, c[0] + 1))
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
        calls.append(count[0])
    assert calls == [2, 1]  # the checkpointed layer ran its forward again in the backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], what=name)


def test_gradient_checkpointing_recipe_gives_the_same_losses(tmp_path):
    run_recipe(tiny_raw_recipe(tmp_path, checkpoint={"output_dir": str(tmp_path / "plain")}))
    _, log = run_recipe(
        tiny_raw_recipe(tmp_path, model={"gradient_checkpointing": True}, checkpoint={"output_dir": str(tmp_path / "gc")})
    )
    assert "gradient checkpointing on" in log
    a, b = step_losses(tmp_path / "plain"), step_losses(tmp_path / "gc")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


# ---------------------------------------------------------------------------------------- local HF checkpoints


@pytest.fixture
def local_checkpoint(tmp_path):
    """A tiny Llama saved with ``save_pretrained``: what ``model.name_or_path`` points at."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY_MODEL)).save_pretrained(str(tmp_path / "hf"))
    return tmp_path / "hf"


def _checkpoint_recipe(tmp_path, checkpoint_dir, **sections) -> dict:
    raw = tiny_raw_recipe(tmp_path, **sections)
    raw["model"] = {"name_or_path": str(checkpoint_dir), "dtype": "float32"}
    return raw


def test_local_checkpoint_directory_trains_and_is_not_copied(tmp_path, local_checkpoint):
    summary, log = run_recipe(_checkpoint_recipe(tmp_path, local_checkpoint))
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert summary["base_model"] == str(local_checkpoint)  # save_base_model: auto writes no copy
    assert not (tmp_path / "out" / "base_model").exists()
    assert "Loading weights" not in log


def test_local_checkpoint_loads_in_4bit_through_transformers(tmp_path, local_checkpoint):
    bnb = pytest.importorskip("bitsandbytes")
    raw = _checkpoint_recipe(tmp_path, local_checkpoint, quantization={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"})
    model, _ = prepare_model(RecipeConfig.from_dict(raw), torch.device("cpu"))
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and all(isinstance(m, al.LinearLoRA) for m in quantized)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    summary, _ = run_recipe(raw)
    assert summary["val_loss_after"] < summary["val_loss_before"]


def test_train_compile_gives_the_same_losses(tmp_path):
    """``train.compile: true`` wraps the patched model in torch.compile (inductor); the LoRA layers'
    autograd.Function goes through its custom ops there, and the losses match eager."""
    steps = {"max_steps": 3, "eval_max_batches": 1}
    plain, _ = run_recipe(tiny_raw_recipe(tmp_path, train=steps, checkpoint={"output_dir": str(tmp_path / "plain")}))
    compiled, _ = run_recipe(
        tiny_raw_recipe(tmp_path, train={**steps, "compile": True}, checkpoint={"output_dir": str(tmp_path / "compiled")})
    )
    a, b = step_losses(tmp_path / "plain"), step_losses(tmp_path / "compiled")
    assert a.keys() == b.keys() and len(a) == 3
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), step
    assert compiled["val_loss_after"] == pytest.approx(plain["val_loss_after"], rel=1e-4)
