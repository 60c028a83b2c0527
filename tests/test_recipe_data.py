"""Recipe data pipeline: tokenizer, prompt masking, packing, the step sampler, the loss over targets."""

from __future__ import annotations

import pytest
import torch

from automodel_lora.recipe.config import ConfigError, DataConfig
from automodel_lora.recipe.data import IGNORE_INDEX, Example, StepSampler, build_datasets, collate, pack, tokenize_records
from automodel_lora.recipe.loop import causal_lm_loss_sum, lr_lambda
from automodel_lora.recipe.tokenizer import ByteTokenizer

from .conftest import assert_close, tiny_llama
from .recipe_helpers import write_prompt_completion_data

TOK = ByteTokenizer()


def test_byte_tokenizer_round_trips_utf8_and_reserves_special_ids():
    text = "Grüße, naïve café ☕"
    ids = TOK.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert TOK.decode([TOK.bos_token_id, *ids, TOK.eos_token_id, TOK.pad_token_id]) == text
    assert {TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id} == {256, 257, 258} and TOK.vocab_size == 259


def test_prompt_completion_labels_mask_the_prompt_and_keep_the_completion():
    cfg = DataConfig(path="unused.jsonl")
    (ex,) = tokenize_records([{"prompt": "Q: 2+2? ", "completion": "A: 4"}], TOK, cfg)
    prompt_ids = [TOK.bos_token_id, *TOK.encode("Q: 2+2? ")]
    completion_ids = [*TOK.encode("A: 4"), TOK.eos_token_id]
    assert ex.input_ids == prompt_ids + completion_ids
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def test_text_records_are_all_targets_and_fields_are_configurable():
    cfg = DataConfig(path="unused.jsonl", text_field="body", add_bos=False)
    (ex,) = tokenize_records([{"body": "hello"}], TOK, cfg)
    assert ex.input_ids == ex.labels == [*TOK.encode("hello"), TOK.eos_token_id]


def test_packing_keeps_labels_aligned_with_their_tokens_and_drops_the_partial_tail():
    examples = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7])]
    blocks = pack(examples, seq_len=3)
    assert [b.input_ids for b in blocks] == [[1, 2, 3], [4, 5, 6]]
    assert [b.labels for b in blocks] == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 6]]


def test_unrecognised_records_name_the_file_and_the_expected_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "x", "answer": "y"}\n')
    with pytest.raises(
        ConfigError, match=r"d.jsonl:1: can't tell the format: expected a `text` field, or `prompt` and `completion`"
    ):
        build_datasets(DataConfig(path=str(path)), TOK, seed=0)
    path.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(ConfigError, match=r"record 2 has no string `text` field"):
        build_datasets(DataConfig(path=str(path), packing=False), TOK, seed=0)


def test_causal_lm_loss_over_completion_tokens_matches_transformers_loss(tmp_path):
    # Reference: transformers' own causal-LM loss with the same -100 labels (mean over target tokens).
    cfg = DataConfig(path=str(write_prompt_completion_data(tmp_path / "pc.jsonl", 8)), packing=False, seq_len=64)
    train, _, _ = build_datasets(cfg, TOK, seed=0)
    batch = collate(train[:4], TOK.pad_token_id)
    model = tiny_llama(vocab_size=259)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    n_targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    ours = causal_lm_loss_sum(logits, batch["labels"]) / n_targets
    assert_close(ours, reference, what="completion-only loss")
    # The mask changes the loss: every non-pad token as a target gives another value.
    all_tokens = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    assert n_targets < int((all_tokens[:, 1:] != IGNORE_INDEX).sum())
    assert (
        abs(float(causal_lm_loss_sum(logits, all_tokens)) / int((all_tokens[:, 1:] != IGNORE_INDEX).sum()) - float(ours)) > 1e-3
    )


def test_collate_right_pads_with_no_targets_on_padding():
    batch = collate([Example([1, 2, 3], [1, 2, 3]), Example([4], [4])], pad_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_sampler_two_ranks_read_exactly_the_one_rank_global_batch():
    one = StepSampler(40, batch_size=4, grad_accum_steps=2, world_size=1, seed=3)
    two = StepSampler(40, batch_size=2, grad_accum_steps=2, world_size=2, seed=3)
    assert one.steps_per_epoch == two.steps_per_epoch == 5
    for step in range(12):  # crosses two epoch boundaries
        flat_one = sorted(i for mb in one.micro_batches(step, 0) for i in mb)
        flat_two = sorted(i for r in range(2) for mb in two.micro_batches(step, r) for i in mb)
        assert flat_one == flat_two


def test_sampler_is_a_pure_function_of_the_step_and_reshuffles_each_epoch():
    a = StepSampler(24, 4, 1, 1, seed=5)
    first_epoch = [a.micro_batches(s, 0) for s in range(6)]
    second_epoch = [a.micro_batches(s, 0) for s in range(6, 12)]
    assert sorted(i for mb in first_epoch for b in mb for i in b) == list(range(24))  # every example once
    assert first_epoch != second_epoch
    b = StepSampler(24, 4, 1, 1, seed=5)
    assert b.micro_batches(9, 0) == second_epoch[3]  # a fresh sampler jumps straight to step 9
    unshuffled = StepSampler(24, 4, 1, 1, seed=5, shuffle=False)
    assert unshuffled.micro_batches(1, 0) == [[4, 5, 6, 7]]


def test_sampler_refuses_a_dataset_smaller_than_one_global_batch():
    with pytest.raises(
        ConfigError,
        match=r"the training set has 5 sequences, fewer than one global batch of 8 .*add data or lower the batch size",
    ):
        StepSampler(5, batch_size=2, grad_accum_steps=2, world_size=2, seed=0)


@pytest.mark.parametrize("scheduler", ["cosine", "constant"])
def test_lr_schedule_warmup_then_cosine_to_the_floor(scheduler):
    import math

    total, warmup, floor = 20, 4, 0.1
    got = [lr_lambda(s, total, warmup, scheduler, floor) for s in range(total + 1)]
    for s in range(warmup):
        assert got[s] == pytest.approx((s + 1) / (warmup + 1))
    for s in range(warmup, total + 1):
        progress = (s - warmup) / (total - warmup)
        want = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)) if scheduler == "cosine" else 1.0
        assert got[s] == pytest.approx(want)
    assert got[warmup] == pytest.approx(1.0)
    assert got[total] == pytest.approx(floor if scheduler == "cosine" else 1.0)
