"""A patched model trains under `transformers.Trainer` (and TRL's `SFTTrainer` where installed) with no glue code.

What a Trainer user writes is the three lines of the README:

    al.apply_lora_to_linear_modules(model, cfg)   # freezes the model, adds the adapters
    Trainer(model=model, args=args, train_dataset=ds).train()
    al.save_adapter(model, "out/adapter", cfg)    # HF PEFT format

Checked here on a tiny Llama on the CPU: the loss falls, only adapter parameters train, the base weights are
bitwise unchanged, the saved adapter reloads (here and in HF PEFT) with equal logits, and with
`gradient_checkpointing=True` (re-entrant or not) the adapters still get gradients, as they do with PEFT:
`Trainer` calls `activation_checkpointing_enable`, which for an `input_ids` model calls
`enable_input_require_grads()` itself, so the frozen embedding's output requires grad.
"""

from __future__ import annotations

import pytest
import torch

import automodel_lora as al
from tests.conftest import assert_close, tiny_llama

transformers = pytest.importorskip("transformers")

SEQ_LEN = 16
VOCAB = 128
STEPS = 20
# conftest's default init (std 0.02) with a frozen lm_head behind a frozen final RMSNorm caps every logit near
# 0.02 * hidden = 0.64, so no adapter could take the loss far below ln(128); std 0.2 leaves room to learn.
INIT = dict(initializer_range=0.2)


class RepeatedTokens(torch.utils.data.Dataset):
    """A few fixed random token sequences, repeated: a setup that trains must memorise them quickly."""

    def __init__(self, n_items: int = 64, n_distinct: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.rows = torch.randint(0, VOCAB, (n_distinct, SEQ_LEN), generator=g)
        self.n_items = n_items

    def __len__(self):
        return self.n_items

    def __getitem__(self, i):
        ids = self.rows[i % len(self.rows)]
        return {"input_ids": ids.clone(), "labels": ids.clone()}


def _config() -> al.PeftConfig:
    return al.PeftConfig(match_all_linear=True, dim=8, alpha=16, use_triton=False)


def _patched():
    model = tiny_llama(**INIT)
    cfg = _config()
    assert al.apply_lora_to_linear_modules(model, cfg) == 14  # 7 linears x 2 layers, lm_head excluded
    return model, cfg


def _args(tmp_path, args_cls=None, **overrides):
    """The runs' shared arguments, as ``args_cls`` (TrainingArguments, or a subclass such as TRL's SFTConfig)."""
    kwargs = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return (args_cls or transformers.TrainingArguments)(**kwargs)


def _base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _assert_trained(model, base_before, losses):
    # About 5.5 at the start; memorising 4 sequences takes it to about 0.6 in 30 steps, while a setup whose
    # adapters get no gradient (or no optimizer step) keeps it flat.
    assert len(losses) >= STEPS // 2, losses
    assert losses[-1] < 0.25 * losses[0], f"loss did not fall: first {losses[0]:.3f}, last {losses[-1]:.3f}"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    assert len(trainable) == 2 * 14
    after = _base_state(model)
    assert after.keys() == base_before.keys()
    changed = [k for k in after if not torch.equal(after[k], base_before[k])]
    assert not changed, f"base weights changed: {changed}"
    assert any(m.lora_B.weight.abs().max() > 0 for _, m in al.lora_modules(model)), "lora_B still all zero"


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_trainer_trains_saves_and_reloads(tmp_path):
    model, cfg = _patched()
    base_before = _base_state(model)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=RepeatedTokens())
    trainer.train()
    _assert_trained(model, base_before, _losses(trainer))

    adapter_dir = tmp_path / "adapter"
    al.save_adapter(trainer.model, adapter_dir, cfg)
    ids = RepeatedTokens().rows
    expected = _logits(model, ids)

    fresh = tiny_llama(**INIT)  # same seed: the same base weights
    assert al.load_adapter(fresh, adapter_dir) == 14
    assert_close(_logits(fresh, ids), expected, what="logits reloaded with load_adapter")

    peft = pytest.importorskip("peft")
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(**INIT), str(adapter_dir))
    assert_close(_logits(peft_model, ids), expected, what="logits reloaded with HF PEFT")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_trainer_gradient_checkpointing_trains_adapters(tmp_path, use_reentrant):
    model, _ = _patched()
    assert not model.model.embed_tokens.weight.requires_grad
    base_before = _base_state(model)
    args = _args(
        tmp_path,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RepeatedTokens())
    trainer.train()
    assert model.is_gradient_checkpointing
    _assert_trained(model, base_before, _losses(trainer))

    # One more backward, outside the Trainer: every adapter gets a non-zero gradient through the
    # checkpointed layers (the re-entrant variant only because the embedding output requires grad).
    model.train()
    model.zero_grad(set_to_none=True)
    batch = RepeatedTokens()[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    for name, module in al.lora_modules(model):
        for p in (module.lora_A.weight, module.lora_B.weight):
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: no adapter gradient"


def test_reentrant_checkpointing_needs_input_grads_as_with_peft():
    """Why the Trainer path works: with re-entrant checkpointing and a frozen embedding, the adapters inside a
    checkpointed layer get no gradient unless the embedding output requires grad -- the same rule as for PEFT,
    and the same fix (`enable_input_require_grads`, which `gradient_checkpointing_enable` already calls)."""
    model, _ = _patched()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    for hook in getattr(model, "_require_grads_hooks", []):  # undo what gradient_checkpointing_enable did
        hook.remove()
    batch = RepeatedTokens()[0]
    with pytest.warns(UserWarning, match="requires_grad"):
        loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
    if loss.requires_grad:  # lm_head's input is outside the checkpoints but lm_head is frozen
        loss.backward()
    assert all(m.lora_A.weight.grad is None for _, m in al.lora_modules(model))

    model.enable_input_require_grads()
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    assert all(m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().max() > 0 for _, m in al.lora_modules(model))


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


def test_trl_sft_trainer_with_gradient_checkpointing(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    model, cfg = _patched()
    base_before = _base_state(model)
    rows = RepeatedTokens().rows
    texts = [" ".join(f"t{int(t)}" for t in rows[i % len(rows)]) for i in range(64)]
    args = _args(
        tmp_path,
        trl.SFTConfig,
        output_dir=str(tmp_path / "sft"),
        max_length=SEQ_LEN + 1,  # the sequence and the EOS SFTTrainer appends
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
        # SFTConfig defaults to bf16=True; accelerate then leaves the model's forward wrapped in autocast
        # after training, so the fp32 comparison below would compare bf16 logits (PEFT models alike).
        bf16=False,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=_word_tokenizer(),
    )
    trainer.train()
    _assert_trained(model, base_before, _losses(trainer))
    al.save_adapter(trainer.model, tmp_path / "adapter", cfg)
    fresh = tiny_llama(**INIT)
    al.load_adapter(fresh, tmp_path / "adapter")
    assert_close(_logits(fresh, rows), _logits(model, rows), what="logits reloaded after SFTTrainer")


def test_non_reentrant_checkpointing_needs_no_input_grads():
    """Non-re-entrant checkpointing (Trainer's default) trains the adapters even with no input-grads hook."""
    model, _ = _patched()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for hook in getattr(model, "_require_grads_hooks", []):
        hook.remove()
    batch = RepeatedTokens()[0]
    model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
    assert all(m.lora_B.weight.grad is not None and m.lora_B.weight.grad.abs().max() > 0 for _, m in al.lora_modules(model))
