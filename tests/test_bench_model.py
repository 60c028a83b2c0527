"""``benchmarks/bench_lora.py --sections model --model-base nf4 --smoke`` on the CPU, a check of the script: the
QLoRA protocol's base has every projection in bitsandbytes NF4 (biases kept), every arm is built on it and runs a
step, and PEFT's logits agree with our reference on that same base. (On the CPU our kernel arm runs the PyTorch
path; the kernels on an NF4 base are tested in test_qlora.py.)"""

from __future__ import annotations

import sys

import pytest

from .recipe_helpers import REPO

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_lora
        import bench_model

        yield bench_lora, bench_model
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_quantize_projections_replaces_every_projection_and_keeps_biases(bench):
    import bench_model_shapes
    import torch

    _, bench_model = bench
    cfg, cls, _ = bench_model_shapes.select(["0.5b"], smoke=True)[0].build()  # Qwen2: q / k / v carry biases
    torch.manual_seed(0)
    model = cls(cfg).to(torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    bias = q.bias.detach().clone()
    assert bench_model.quantize_projections(model) == 7 * cfg.num_hidden_layers
    q4 = model.model.layers[0].self_attn.q_proj
    assert isinstance(q4, bnb.nn.Linear4bit) and torch.equal(q4.bias.detach(), bias)
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())  # no projection left in bf16


def test_the_nf4_model_protocol_runs_every_arm_on_the_quantized_base(bench, tmp_path):
    bench_lora, _ = bench
    results = bench_lora.main(["--sections", "model", "--smoke", "--model-base", "nf4", "--model-shapes", "0.5b",
                               "--model-variants", "frozen,triton,torch,peft_bf16", "--out", str(tmp_path / "r.json")])
    rows = {r["variant"]: r for r in results["model"]}
    assert set(rows) == {"frozen", "triton", "torch", "peft_bf16"} and not results["model_skipped"]
    assert all(r["base"] == "nf4" for r in rows.values()) and results["model_shapes"][0]["base"] == "nf4"
    assert all(rows[k]["logits_ok"] for k in ("triton", "torch", "peft_bf16"))
