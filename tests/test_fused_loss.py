"""``train.fused_loss: liger``: the loss from the hidden states and the head's weight (``recipe.fused_loss``).

Runs in two modes:
    pytest tests/test_fused_loss.py                      # the settings and models it refuses (no liger_kernel needed)
    TRITON_INTERPRET=1 pytest tests/test_fused_loss.py   # + Liger's kernels in the interpreter, against the plain loss
Tests named *_interp run only under the interpreter, with liger_kernel installed (skipped otherwise).

Tolerances (fp32), elementwise ``|a - e| <= rtol |e| + atol max|e|`` against ``causal_lm_loss_sum`` on the same
model and batch. Both paths compute the same fp32 logits, each a dot product of H = 32 terms (H + r with the
adapted head, which the plain path sums as H terms plus r): summed in another order they differ by a few eps
(1.2e-7) of the terms' scale, ~sqrt(H) eps typically, H eps ~ 4e-6 at worst. Liger's log-sum-exp is an online
softmax in the Triton kernel, torch's a two-pass one: a few ulps apart. The loss sums ~60 token losses of ~5 each,
rounding each sum once: rtol 1e-5. The logit gradient ``softmax - onehot`` carries the same few-eps errors into
the backward of a two-layer model, which adds its own order of summation (measured: <= 1.6e-6 of the largest
gradient of every parameter): rtol 1e-5, atol 1e-5 of max|e|. A wrong term is far outside: the head's adapter
moves the loss by > 1e-3 relative (checked below), an unshifted target or a counted padding position by O(1).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

from automodel_lora import PeftConfig, apply_lora_to_linear_modules
from automodel_lora.recipe.config import ConfigError, RecipeConfig
from automodel_lora.recipe.data import IGNORE_INDEX
from automodel_lora.recipe.loop import causal_lm_loss_sum

from .conftest import scaled_check, tiny_llama
from .recipe_helpers import TINY_MODEL, run_recipe, step_losses, tiny_raw_recipe

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (Liger's Triton kernels on the CPU)")

RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture
def liger():
    return pytest.importorskip("liger_kernel")


@pytest.fixture
def liger_installed(monkeypatch):
    """The config's import check passes whether or not liger_kernel is installed (for the refusals)."""
    monkeypatch.setattr("automodel_lora.recipe.fused_loss.liger_available", lambda: True)


check = scaled_check(RTOL, ATOL)


def adapted_llama(head: str, dropout: float = 0.0) -> nn.Module:
    """The conftest's tiny Llama (vocab 128, hidden 32), LoRA on q/v and, per ``head``, on or through lm_head:
    plain (frozen, no adapter) | lora | lora_bias | trained (the head's weight trained fully). lora_B random, so
    every adapter term counts."""
    model = tiny_llama()
    targets = ["q_proj", "v_proj"] + (["lm_head"] if head.startswith("lora") else [])
    # With dropout, the reference LinearLoRA (use_triton=False): its nn.Dropout draws the head's mask as the fused
    # loss does; FusedLinearLoRA's kernels draw their masks their own way (the same distribution, other values).
    cfg = PeftConfig(
        target_modules=targets,
        dim=4,
        alpha=8,
        dropout=dropout,
        dropout_position="pre",
        lora_bias=head == "lora_bias",
        use_triton=dropout == 0,
    )
    apply_lora_to_linear_modules(model, cfg)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    if head == "trained":
        model.lm_head.weight.requires_grad_(True)
    return model.train()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, labels), (2, 16): a prompt of 5 positions without loss in row 0, 4 padding positions in row 1."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[1, 12:] = IGNORE_INDEX
    return ids, mask, labels


def loss_and_grads(model: nn.Module, fused: bool) -> tuple[torch.Tensor, dict]:
    from automodel_lora.recipe.fused_loss import fused_causal_lm_loss_sum

    ids, mask, labels = batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)  # the same dropout masks on both paths (the same modules draw them, in the same order)
    if fused:
        loss = fused_causal_lm_loss_sum(model, ids, mask, labels)
    else:
        loss = causal_lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------- against the plain loss


@interp_only
@pytest.mark.parametrize("head, dropout", [("plain", 0.0), ("lora", 0.0), ("lora", 0.2), ("lora_bias", 0.0), ("trained", 0.0)])
def test_loss_and_every_gradient_equal_the_plain_loss_interp(liger, head, dropout):
    model = adapted_llama(head, dropout)
    expected, expected_grads = loss_and_grads(model, fused=False)
    got, grads = loss_and_grads(model, fused=True)
    assert got.dtype == torch.float32 and got.shape == ()
    check(got, expected, "loss")
    assert grads.keys() == expected_grads.keys()
    assert any("lm_head" in n for n in grads) == (head != "plain")
    for name, grad in expected_grads.items():
        assert grads[name] is not None, name
        check(grads[name], grad, name)


@interp_only
def test_the_head_adapter_moves_the_loss_far_beyond_the_tolerance_interp(liger):
    """The check above would catch a fused path that dropped the head's adapter: it moves the loss by over 100
    times the tolerance."""
    model = adapted_llama("lora")
    with_adapter, _ = loss_and_grads(model, fused=True)
    model.lm_head.lora_enabled = False
    without, _ = loss_and_grads(model, fused=True)
    plain_without, _ = loss_and_grads(model, fused=False)
    check(without, plain_without, "loss, adapter off")
    assert abs(with_adapter - without) > 100 * RTOL * abs(without)


@pytest.mark.slow
@interp_only
def test_a_recipe_run_gives_the_losses_of_the_plain_loss_interp(liger, tmp_path):
    """A few steps of the tiny recipe (LoRA on q, v, down and lm_head), plain and fused: the same losses."""
    peft = {"match_all_linear": False, "target_modules": ["q_proj", "v_proj", "down_proj", "lm_head"]}
    train = {"max_steps": 3, "batch_size": 2, "eval_max_batches": 1}
    runs = {}
    for setting in (False, "liger"):
        out = tmp_path / str(setting)
        raw = tiny_raw_recipe(tmp_path, peft=peft, train={**train, "fused_loss": setting}, checkpoint={"output_dir": str(out)})
        raw["data"]["seq_len"] = 32
        summary, log = run_recipe(raw)
        runs[setting] = (summary, step_losses(out), log)
    (plain_summary, plain, _), (fused_summary, fused, log) = runs[False], runs["liger"]
    assert "[fused_loss] fused linear + cross-entropy (Liger)" in log
    assert plain.keys() == fused.keys() == {1, 2, 3}
    for step in plain:  # the loss's rounding (rtol above), carried by AdamW into two steps: measured <= 1e-7
        assert fused[step] == pytest.approx(plain[step], rel=RTOL), step
    assert fused_summary["val_loss_after"] == pytest.approx(plain_summary["val_loss_after"], rel=RTOL)


# ---------------------------------------------------------------------------------------- what it refuses


@pytest.mark.parametrize("value", ["chunked", True, "Liger"])
def test_an_unknown_value_names_it_and_the_fix(tmp_path, value):
    with pytest.raises(ConfigError, match=r"`train.fused_loss` must be false, liger or auto; got .*Set train.fused_loss=liger"):
        RecipeConfig.from_dict(tiny_raw_recipe(tmp_path, train={"fused_loss": value}))


def test_the_default_is_false(tmp_path):
    assert RecipeConfig.from_dict(tiny_raw_recipe(tmp_path)).train.fused_loss is False


def test_liger_not_installed_names_the_pip_install(tmp_path, monkeypatch):
    monkeypatch.setattr("automodel_lora.recipe.fused_loss.liger_available", lambda: False)
    with pytest.raises(ConfigError, match="`pip install liger-kernel`"):
        RecipeConfig.from_dict(tiny_raw_recipe(tmp_path, train={"fused_loss": "liger"}))


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"compile": True}}, "train.compile: true"),
        ({"train": {"cuda_graphs": True}}, "Liger counts the target tokens on the host"),
    ],
)
def test_settings_it_cannot_run_under_are_refused(tmp_path, liger_installed, sections, message):
    raw = tiny_raw_recipe(tmp_path, **sections)
    raw["train"]["fused_loss"] = "liger"
    with pytest.raises(ConfigError, match=message):
        RecipeConfig.from_dict(raw)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_multi_process_strategy_is_accepted_for_one_process(tmp_path, liger_installed, strategy):
    """One process ignores ``distributed.strategy`` (the QLoRA recipe names ddp for torchrun): the config takes it,
    and only a run of several processes is refused (``check_fused_loss``, when the world size is known)."""
    raw = tiny_raw_recipe(tmp_path, distributed={"strategy": strategy})
    raw["train"]["fused_loss"] = "liger"
    assert RecipeConfig.from_dict(raw).distributed.strategy == strategy


def test_several_adapters_are_refused(tmp_path, liger_installed):
    raw = tiny_raw_recipe(tmp_path, train={"fused_loss": "liger"})
    raw["data"]["adapters"] = {"alpha": raw["data"].pop("path")}
    with pytest.raises(ConfigError, match="`data.adapters`.*`train.fused_loss: liger`"):
        RecipeConfig.from_dict(raw)


def test_cuda_graphs_auto_is_off_with_the_fused_loss(liger_installed):
    from automodel_lora.recipe.graphs import graphs_blockers
    from automodel_lora.recipe.sections import TrainConfig

    class Env:
        device, world_size = torch.device("cuda"), 1

    assert graphs_blockers(Env(), TrainConfig(cuda_graphs="auto", fused_loss="liger", max_steps=1), fused_loss=True) == [
        "train.fused_loss is on (Liger counts the target tokens on the host, which a capture can't hold)"
    ]


def test_processes_and_devices_it_cannot_run_on(monkeypatch):
    from automodel_lora.recipe.fused_loss import check_fused_loss

    model = tiny_llama()
    with pytest.raises(ConfigError, match="with 2 processes"):
        check_fused_loss(model, 2, torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="runs Triton kernels: the device is cpu.*TRITON_INTERPRET=1"):
        check_fused_loss(model, 1, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_fused_loss(model, 1, torch.device("cpu"))


@pytest.mark.parametrize(
    "model_type, extra, attr",
    [
        ("gemma2", {"head_dim": 8}, "final_logit_softcapping"),
        ("cohere", {}, "logit_scale"),
        ("granite", {"logits_scaling": 8.0}, "logits_scaling"),
    ],
)
def test_a_model_that_transforms_its_logits_is_refused_naming_the_attribute(model_type, extra, attr):
    from transformers import AutoModelForCausalLM

    from automodel_lora.recipe.fused_loss import fused_head
    from automodel_lora.recipe.model import tiny_config

    tiny = {k: v for k, v in TINY_MODEL.items() if k != "max_position_embeddings"}
    model = AutoModelForCausalLM.from_config(tiny_config({"model_type": model_type, **tiny, **extra}))
    with pytest.raises(ConfigError, match=f"sets `{attr}: .*train.fused_loss=false"):
        fused_head(model)


def test_a_softcapping_model_is_refused_when_the_recipe_builds_it(tmp_path, liger_installed, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check, to the model's
    raw = tiny_raw_recipe(tmp_path, train={"fused_loss": "liger"})
    raw["model"]["tiny"].update(model_type="gemma2", head_dim=8)
    with pytest.raises(ConfigError, match="`final_logit_softcapping: 30.0`"):
        run_recipe(raw)


def test_heads_it_cannot_fold_in_are_refused(monkeypatch):
    from automodel_lora.recipe.fused_loss import check_fused_loss, fused_head

    class ScaledHead(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(ConfigError, match="LlamaModel has no decoder body and output head to call apart"):
        fused_head(tiny_llama().model)
    model = tiny_llama()
    model.lm_head.__class__ = ScaledHead
    with pytest.raises(ConfigError, match=r"the output head \(ScaledHead\) is not a plain dense nn.Linear"):
        fused_head(model)
    dora = tiny_llama()
    apply_lora_to_linear_modules(dora, PeftConfig(target_modules=["lm_head"], use_dora=True))
    with pytest.raises(ConfigError, match="has a DoRA adapter"):
        fused_head(dora)
    post = tiny_llama()
    apply_lora_to_linear_modules(post, PeftConfig(target_modules=["lm_head"], dropout=0.1, dropout_position="post"))
    fused_head(post)  # eval mode: no dropout
    with pytest.raises(ConfigError, match="dropout_position: post, dropout 0.1"):
        fused_head(post.train())
    post.eval()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="dropout_position: post"):  # the run trains, whatever the mode now
        check_fused_loss(post, 1, torch.device("cpu"))
