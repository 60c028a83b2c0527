"""The setup phase of a :class:`~automodel_lora.recipe.train.Recipe`, in the order it runs.

1. the output directory's lock, first, so a second run on it fails at once (the directory and its
   ``.lock`` file are created even when an input turns out bad);
2. inputs: model config, tokenizer and data, checked before anything else is written;
3. the output directory: leftovers of killed runs removed, another run never overwritten;
4. the checkpoint to resume from: the newest intact one (a damaged one is named and skipped);
5. model, adapter weights, optimizer and scheduler, RNG; metrics truncated to the resumed step.
   A checkpoint whose adapter, optimizer or scheduler state fails to load is skipped too: the
   model is built afresh and the next older checkpoint restored into it.

Every decision that touches files is made on rank 0 and agreed by all ranks, so a refusal ends
every rank with the same error instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from ..adapter_slots import adapter_weights
from .checkpoint import CheckpointManager, LoadedCheckpoint, agree
from .config import ConfigError, RecipeConfig
from .data import StepSampler, build_datasets, eval_batches
from .distributed import DistEnv, barrier, wrap_model
from .errors import CheckpointError, RunDirError
from .files import atomic_write_text, clean_stale, writing
from .flops import peak_bf16_flops, train_flops_per_token
from .fused_loss import check_fused_loss
from .fused_norm import use_fused_norm
from .graphs import MixedStep, recipe_step, use_cuda_graphs
from .loop import use_bf16
from .model import load_model_config, prepare_model
from .optim import apply_settings, build_optimizer
from .progress import ProgressBar
from .rundir import RunLock, move_aside
from .tokenizer import build_tokenizer, tokenizer_spec

__all__ = ["RecipeSetup", "TrainState"]


@dataclass
class TrainState:
    """The counters a checkpoint carries besides tensors (stored in ``trainer_state.json``)."""

    step: int = 0
    tokens: int = 0
    val_loss_before: float | None = None
    first_loss: float | None = None
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, in the whole run
    # Non-finite steps in a row up to ``step``: carried across reruns, so train.max_nonfinite_skips
    # counts a streak that spans a restart. A checkpoint is saved only when it is 0 (``Recipe``).
    nonfinite_in_a_row: int = 0

    @classmethod
    def from_json(cls, raw: dict) -> TrainState:
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class RecipeSetup:
    """State of a run and its ``setup`` phase (the training phases are in :class:`Recipe`).

    Args:
        cfg: The validated recipe.
        env: The distributed environment (``setup_distributed``).
        stream: Where the progress bar and messages go (default stderr; rank 0 only).
        t_start: ``time.perf_counter()`` at the start of the run (for the summary's wall time).
    """

    def __init__(self, cfg: RecipeConfig, env: DistEnv, stream=None, t_start: float = 0.0):
        self.cfg, self.env, self.t_start = cfg, env, t_start
        self.ck = cfg.checkpoint
        self.out_dir = Path(self.ck.output_dir)
        self.bar = ProgressBar(total=1, enabled=env.is_main, stream=stream, every=cfg.train.log_every)
        self.say = self.bar.write
        self.lock: RunLock | None = None
        self.metrics = None
        self.model = self.raw_model = self.fwd_model = self.optimizer = self.scheduler = None
        self.graphed = None  # train.cuda_graphs, when on: the GraphedStep (a MixedStep with data.adapters)
        self.fused_loss = self.fused_norm = False  # train.fused_loss / fused_norm as resolved at setup
        self.said_eager: set = set()  # its input signatures whose eager fallback was said
        self.val_by_adapter: dict = {}  # with data.adapters: {"val_loss/<name>": loss} of the last evaluation
        self.loaded: LoadedCheckpoint | None = None
        self.state = TrainState()
        self.flops_per_token: float | None = None  # None: MFU unknown (see recipe.flops)
        self.peak_flops: float | None = None
        self.start_step, self.resumed = 0, False
        self.last_checkpoint: Path | None = None  # the newest checkpoint known good: resumed from or saved
        self.last_saved = -1  # step of the checkpoint saved last by this process
        self.last_loss: float | None = None

    # ---------------------------------------------------------------- the phase
    def setup(self) -> dict | None:
        """Check inputs, take the output directory, pick the checkpoint, build everything.

        Returns:
            None, or the summary of a run that had already finished (nothing left to train).

        Raises:
            ConfigError: a bad input; ``RunDirError`` / ``CheckpointError`` for the output
                directory and the checkpoint to resume from.
        """
        self._on_main(self._lock, "lock the output directory")
        self._check_inputs()
        self._take_output_dir()
        self._pick_checkpoint()
        finished = self._finished_summary()
        if finished is not None:
            return finished
        self._guard_other_runs()
        while True:
            self._build_model()
            self._restore_adapter()
            if self._build_optimizer():
                break
            self.raw_model = self.model = self.optimizer = self.scheduler = self.params = None  # built afresh
        self._open_metrics()
        return None

    def cleanup(self) -> None:
        """Close the metrics, drop the model (so ``distributed.cleanup`` can free it), release the lock."""
        if self.metrics is not None:
            self.metrics.close()
        self.model = self.raw_model = self.fwd_model = self.optimizer = self.scheduler = self.params = None
        self.graphed = None
        if self.lock is not None:
            self.lock.release()

    # ---------------------------------------------------------------- 1. inputs
    def _check_inputs(self) -> None:
        cfg, env, tc, dc = self.cfg, self.env, self.cfg.train, self.cfg.data
        model_config = load_model_config(cfg.model)
        max_pos = getattr(model_config, "max_position_embeddings", None)
        if max_pos is not None and dc.seq_len > max_pos:
            raise ConfigError(
                f"`data.seq_len: {dc.seq_len}` is larger than the model's max_position_embeddings ({max_pos}); "
                f"set data.seq_len <= {max_pos}"
            )
        spec = tokenizer_spec(dc.tokenizer, cfg.model)
        if spec != dc.tokenizer:
            self.say(f"[data] {cfg.model.name_or_path} has no tokenizer: using the byte tokenizer (model.random_init)")
        self.tokenizer = build_tokenizer(spec, cfg.model.name_or_path, cfg.model.trust_remote_code)
        vocab = getattr(model_config, "vocab_size", None)
        if vocab is not None and self.tokenizer.vocab_size > vocab:
            raise ConfigError(
                f"the tokenizer ({self.tokenizer.name}) has {self.tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {vocab}"
            )
        self.adapter_data = {}  # with data.adapters: name -> (train set, validation set, sampler), each its own
        for name, path in (dc.adapters or {None: dc.path}).items():
            train_set, val_set, info = build_datasets(replace(dc, path=path, adapters=None), self.tokenizer, tc.seed)
            sampler = StepSampler(len(train_set), tc.batch_size, tc.grad_accum_steps, env.world_size, tc.seed, dc.shuffle)
            self.adapter_data[name] = (train_set, val_set, sampler)
            self.say(
                f"[data]{f' adapter {name}:' if name else ''} {info['train_records']} train records -> "
                f"{len(train_set)} sequences of <= {dc.seq_len} tokens ({'packed' if dc.packing else 'padded'}); "
                f"{len(val_set)} validation sequences" + (f"; {info['truncated']} truncated" if info["truncated"] else "")
            )
        # the first (or only) adapter's data: what counts epochs and what a single-adapter run trains on
        self.train_set, self.val_set, self.sampler = next(iter(self.adapter_data.values()))
        sampler = self.sampler
        if tc.max_steps is not None:
            self.total_steps = tc.max_steps
        else:
            self.total_steps = max(1, int(math.ceil((tc.epochs or 1) * sampler.steps_per_epoch)))
        self.warmup = tc.warmup_steps if tc.warmup_steps is not None else int((tc.warmup_ratio or 0.0) * self.total_steps)
        self.use_bf16 = use_bf16(tc.bf16, env.device)
        self.say(
            f"[train] {self.total_steps} steps x global batch {sampler.global_batch} "
            f"({tc.batch_size} x {tc.grad_accum_steps} accum x {env.world_size} proc) = "
            f"{self.total_steps / sampler.steps_per_epoch:.2f} epochs; device {env.device}, strategy {env.strategy}, "
            f"bf16 autocast {'on' if self.use_bf16 else 'off'}"
        )

    # ---------------------------------------------------------------- 2. output directory
    def _on_main(self, fn, what: str):
        """Run ``fn`` on rank 0; if it raises a ``ConfigError`` every rank raises (rank 0 its own)."""
        error = None
        if self.env.is_main:
            try:
                fn()
            except ConfigError as e:
                error = e
        if not agree(error is None, self.env):
            raise error or RunDirError(f"rank 0 failed to {what} in {self.out_dir}")

    def _lock(self) -> None:
        self.lock = RunLock(self.out_dir).acquire()

    def _take_output_dir(self) -> None:
        def clean():
            # Only now, holding the lock, is no other run writing here: leftovers are a killed run's.
            for d in (self.out_dir, self.out_dir / "checkpoints"):
                for p in clean_stale(d):
                    self.say(f"[checkpoint] removed {p.name}, left by a run that was killed while writing")

        self._on_main(clean, "clean the output directory")
        self.ckpts = CheckpointManager(self.out_dir, self.ck.keep_last, self.env)

    # ---------------------------------------------------------------- 3. checkpoint to resume from
    def _pick_checkpoint(self) -> None:
        self._candidates = iter(self.ckpts.candidates(self.ck.resume))
        self._explicit = self.ck.resume not in (None, "auto")
        self._skipped: list[str] = []
        self._skipped_paths: set[Path] = set()  # damaged checkpoints of this directory: not another run
        self.loaded = self._next_readable()

    def _next_readable(self) -> LoadedCheckpoint | None:
        """The next candidate whose files read and check on every rank (None when none is left)."""
        for path in self._candidates:
            error, loaded = None, None
            try:
                loaded = self.ckpts.read(path)
            except CheckpointError as e:
                error = e
            if agree(error is None, self.env):
                return loaded
            self._reject(path, error)
        return None

    def _reject(self, path: Path, error: Exception | None) -> None:
        """A damaged checkpoint: fatal if asked for by path; otherwise skipped with a warning."""
        reason = str(error) if error is not None else "unreadable on another rank"
        if self._explicit:
            raise CheckpointError(f"`checkpoint.resume`: can't resume from {path}: {reason}")
        self._skipped.append(f"{path.name}: {reason}")
        self._skipped_paths.add(path)
        self.say(f"[resume] warning: skipping checkpoint {path}: {reason}")

    def _no_intact_checkpoint(self) -> CheckpointError:
        return CheckpointError(
            f"no intact checkpoint to resume from in {self.ckpts.root}:\n  " + "\n  ".join(self._skipped) + "\n"
            "Move the damaged ones away to start afresh, or set checkpoint.output_dir to another directory"
        )

    def _finished_summary(self) -> dict | None:
        if self.loaded is None and self._skipped:
            raise self._no_intact_checkpoint()
        summary = self.out_dir / "summary.json"
        if self.loaded is not None and self.loaded.step >= self.total_steps and summary.is_file():
            self.say(
                f"[resume] {self.loaded.path} is the end of a finished run ({self.total_steps} steps); nothing to train. "
                "To start over in this directory pass checkpoint.resume=null checkpoint.overwrite=true; "
                "to keep this run, pass another checkpoint.output_dir=DIR"
            )
            return json.loads(summary.read_text())
        return None

    def _guard_other_runs(self) -> None:
        """Refuse to start in a directory holding another run's checkpoints, unless ``overwrite``."""
        own = self.loaded.state["run_id"] if self.loaded is not None else None
        others = [
            p
            for _, p in self.ckpts.step_dirs()
            if p not in self._skipped_paths and (own is None or self.ckpts.run_id_of(p) != own)
        ]
        if own is None and (self.out_dir / "summary.json").is_file():
            others.append(self.out_dir / "summary.json")
        self.run_id = own or uuid.uuid4().hex
        self.ckpts.run_id = self.run_id
        if not others:
            return
        if not self.ck.overwrite:
            what = "resumes from another run's checkpoint" if own is not None else "would start fresh"
            raise RunDirError(
                f"`checkpoint.output_dir`: {self.out_dir} holds another run ({', '.join(p.name for p in others[:3])}) "
                f"and this run {what}. Choose one: resume it (checkpoint.resume=auto), write to another "
                f"directory (checkpoint.output_dir=...), or move the old run aside to a timestamped sibling "
                f"(checkpoint.overwrite=true; nothing is deleted)"
            )
        self._on_main(self._move_old_run_aside, "move the old run aside")
        barrier(self.env)

    def _move_old_run_aside(self) -> None:
        old_lock, old_dir = self.lock, self.out_dir.resolve()
        resume_path = self.loaded.path.resolve() if self.loaded is not None else None
        moved = move_aside(self.out_dir)  # the lock file moves with it: still held, nobody else got in
        self.lock = RunLock(self.out_dir).acquire()
        old_lock.release()
        self.say(f"[checkpoint] checkpoint.overwrite: moved the previous run in {self.out_dir} to {moved}")
        if resume_path is not None and resume_path.is_relative_to(old_dir):  # resuming from the moved run
            self.loaded.path = moved / resume_path.relative_to(old_dir)

    # ---------------------------------------------------------------- 4. model, optimizer, metrics
    def _build_model(self) -> None:
        cfg, ck = self.cfg, self.ck
        torch.manual_seed(cfg.train.seed)
        self.save_base = ck.save_base_model if ck.save_base_model != "auto" else cfg.model.tiny is not None
        self.base_dir = self.out_dir / "base_model"
        # A resumed run keeps the base it started from (rebuilding it from the seed gives the same one).
        write_base = (
            self.save_base and self.env.is_main and (self.loaded is None or not (self.base_dir / "config.json").is_file())
        )
        model, description = prepare_model(cfg, self.env.device, save_base_to=self.base_dir if write_base else None)
        self.say(f"[model] {description}")
        self._liger_switches(model)
        self.raw_model = model
        # Counted on the unsharded model, before FSDP2 splits the adapters over the ranks.
        n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.flops_per_token = train_flops_per_token(load_model_config(cfg.model), cfg.data.seq_len, n_adapter)
        self.peak_flops = peak_bf16_flops(self.env.device)

    def _liger_switches(self, model: nn.Module) -> None:
        """``train.fused_loss`` / ``train.fused_norm`` as this run takes them (see ``_liger_switch``)."""
        env = self.env

        def take_loss():
            if self.cfg.data.adapters:  # the config refuses liger with them; auto turns it off
                raise ConfigError("`data.adapters`: each adapter's loss is taken from its rows of the logits")
            check_fused_loss(model, env.world_size, env.device)
            self.say("[fused_loss] fused linear + cross-entropy (Liger): no (tokens, vocab) logits in the training step")

        def take_norm():
            n_norms = use_fused_norm(model, env.device)
            self.say(f"[fused_norm] {n_norms} RMSNorm modules run Liger-Kernel's RMSNorm kernel")

        self.fused_loss = self._liger_switch("fused_loss", take_loss)
        self.fused_norm = self._liger_switch("fused_norm", take_norm)

    def _liger_switch(self, setting: str, take) -> bool:
        """Whether the run takes ``train.<setting>``: false no; liger yes (``take()`` checks the model and device,
        a ConfigError where they can't run it); auto where the config's conditions for liger and ``take()`` both
        hold, else the plain path, and the run says why."""
        value = getattr(self.cfg.train, setting)
        if value is False:
            return False
        try:
            if value == "auto":
                replace(self.cfg.train, **{setting: "liger"})  # the config's own conditions for liger
            take()
        except ConfigError as e:
            if value != "auto":
                raise
            self.say(f"[{setting}] plain (train.{setting}=auto, no Liger here: {e})")
            return False
        return True

    def _restore_adapter(self) -> None:
        """Load the picked checkpoint's adapter; a damaged one is skipped for the next older one."""
        while self.loaded is not None:
            error = None
            try:
                self.ckpts.check_shapes(self.loaded, self.raw_model)
                self.ckpts.load_adapter_weights(self.raw_model, self.loaded.path)
            except CheckpointError as e:
                error = e
            if agree(error is None, self.env):
                return
            self._reject(self.loaded.path, error)
            self.loaded = self._next_readable()
        if self._skipped:
            raise self._no_intact_checkpoint()

    def _build_optimizer(self) -> bool:
        """Wrap the model, build the optimizer and schedule, restore the checkpoint's state into them.

        Returns:
            False if the checkpoint's optimizer or scheduler state failed to load on a rank: it was
            skipped, ``self.loaded`` is the next candidate, and the model must be built afresh.
        """
        cfg, tc, env = self.cfg, self.cfg.train, self.env
        self.model = wrap_model(self.raw_model, env, cfg.distributed)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # each adapter's weights, clipped by their own norm (data.adapters)
        self.adapter_params = adapter_weights(self.raw_model, list(cfg.data.adapters)) if cfg.data.adapters else {}
        self.optimizer, self.scheduler = build_optimizer(self.params, tc, self.total_steps, self.warmup)
        if self.loaded is not None:
            error = None
            try:
                self.ckpts.load_optimizer(self.model, self.optimizer, self.scheduler, self.loaded)
            except CheckpointError as e:
                error = e
            if not agree(error is None, env):
                self._reject(self.loaded.path, error)
                self.loaded = self._next_readable()
                return False
            for change in apply_settings(self.optimizer, self.scheduler, tc):
                self.say(f"[resume] {change}")
            self.state = TrainState.from_json(self.loaded.state)
            self.start_step, self.resumed = self.loaded.step, True
            self.last_checkpoint, self.last_saved = self.loaded.path, self.loaded.step
            if not self.ckpts.load_rng(self.loaded):
                torch.manual_seed(tc.seed + env.rank + self.start_step)
            self.say(f"[resume] from {self.loaded.path} at step {self.start_step}/{self.total_steps}")
            self.loaded = None  # the optimizer state is in the optimizer now: don't hold a second copy
        else:
            torch.manual_seed(tc.seed + env.rank)  # dropout differs per rank
        self.fwd_model = torch.compile(self.model) if tc.compile else self.model
        on, why = use_cuda_graphs(env, tc, cfg.data, self.fused_loss,
                                  getattr(getattr(self.raw_model, "config", None), "hidden_size", None))
        fallback = tc.cuda_graphs == "auto"
        if not on:
            self.graphed = None
        elif cfg.data.adapters:
            self.graphed = MixedStep(self.raw_model, self.fwd_model, self.params, self.use_bf16, fallback=fallback)
        else:
            self.graphed = recipe_step(self.fwd_model, self.params, self.use_bf16, fallback=fallback)
        if env.device.type == "cuda":
            self.say(f"[cuda graphs] {why}")
        return True

    def _open_metrics(self) -> None:
        """``metrics.jsonl`` keeps exactly the records up to the step this run starts from."""
        out, tc = self.out_dir, self.cfg.train

        def prepare():
            with writing("config.yaml and metrics.jsonl", out):
                atomic_write_text(out / "config.yaml", self.cfg.to_yaml())
                _trim_metrics(out / "metrics.jsonl", self.start_step if self.resumed else None)

        self._on_main(prepare, "write config.yaml")
        error = None
        try:
            self.metrics = self.new_metrics_writer(out / "metrics.jsonl", self.env.is_main)
        except ConfigError as e:
            error = e
        if not agree(error is None, self.env):
            raise error or RunDirError(f"rank 0 failed to open metrics.jsonl in {out}")
        size = tc.eval_batch_size or tc.batch_size
        self.val_batches = {name: eval_batches(val, size, tc.eval_max_batches) for name, (_, val, _) in
                            self.adapter_data.items()}
        self.val = next((b for b in self.val_batches.values() if b), [])  # truthy where any validation runs
        if self.state.val_loss_before is None and self.val:
            self.state.val_loss_before = self.evaluate()
            self.say(f"[eval] step {self.start_step}: val_loss {self.state.val_loss_before:.4f} (before training)")
            self.metrics.write({"step": self.start_step, "val_loss": self.state.val_loss_before, **self.val_by_adapter})

    def new_metrics_writer(self, path: Path, enabled: bool):  # pragma: no cover - Recipe overrides it
        raise NotImplementedError

    def evaluate(self) -> float | None:  # pragma: no cover - Recipe overrides it
        raise NotImplementedError


def _trim_metrics(path: Path, step: int | None) -> None:
    """Keep the records of steps <= ``step`` (a resume re-logs the later ones); None: keep none
    (a fresh start, or a restart before the first checkpoint). One rename: a kill keeps the old file."""
    if not path.is_file():
        return
    keep = []
    if step is not None:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("step", 0) <= step:
                keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
