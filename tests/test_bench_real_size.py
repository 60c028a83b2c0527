"""``benchmarks/bench_real_size.py --smoke`` on the CPU: both arms train the same model on the same data
and the results file has one row per (run, arm) with the fields the README table reads."""

from __future__ import annotations

import json
import sys

import pytest

from .recipe_helpers import REPO

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_real_size

        yield bench_real_size
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.slow
def test_smoke_runs_both_arms_on_the_same_model_and_data(bench, tmp_path):
    runs = ["llama3_8b_lora", "qwen2_5_7b_lora"]
    results = bench.main(["--smoke", "--runs", ",".join(runs), "--steps", "3", "--out", str(tmp_path)])
    files = list(tmp_path.glob("real_size_cpu_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    rows = {(r["run"], r["arm"]): r for r in results["rows"]}
    assert sorted(rows) == sorted((run, arm) for run in runs for arm in ("ours", "peft_trainer"))
    for run in runs:
        ours, peft = rows[run, "ours"], rows[run, "peft_trainer"]
        for r in (ours, peft):
            assert set(r) >= {"run", "arm", "tok_s", "peak_mib", "mfu", "steps", "final_loss"}
            assert r["steps"] == 3 and r["tok_s"] > 0 and r["final_loss"] == r["losses"][-1]
            assert r["mfu"] is None and r["peak_mib"] is None  # the CPU: no peak, no device memory
        # lora_B starts at zero, so the first loss is the base model's: equal only if model and batch are.
        assert ours["losses"][0] == pytest.approx(peft["losses"][0], rel=1e-6)
        assert ours["flops_per_token"] == peft["flops_per_token"] > 0
    assert results["settings"]["smoke"] and results["gpu"] == "cpu" and results["commit"]


def test_a_second_call_keeps_the_rows_of_other_runs(bench, tmp_path):
    path = tmp_path / "real_size.json"
    old = [{"run": "qwen2_5_7b_lora", "arm": "ours"}, {"run": "llama3_8b_lora", "arm": "ours", "tok_s": 0}]
    path.write_text(json.dumps({"rows": old}))
    bench.main(["--smoke", "--runs", "llama3_8b_lora", "--arms", "ours", "--steps", "2", "--out", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert [(r["run"], r["arm"]) for r in rows] == [("qwen2_5_7b_lora", "ours"), ("llama3_8b_lora", "ours")]
    assert rows[1]["tok_s"] > 0


def test_markdown_table_from_a_results_file(bench):
    rows = [
        {"run": "llama3_8b_lora", "arm": "ours", "tok_s": 3000.0, "peak_mib": 20480.0, "mfu": 0.4, "final_loss": 2.5},
        {"run": "llama3_8b_lora", "arm": "peft_trainer", "tok_s": 2000.0, "peak_mib": 30720.0, "mfu": 0.2, "final_loss": 2.6},
    ]
    lines = bench.markdown_table({"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-12-06T10:00:00", "rows": rows}).splitlines()
    assert lines[2] == (
        "| llama3_8b_lora | NVIDIA H100 80GB HBM3, 2026-12-06 | 3,000 | 2,000 | 1.50x | 20.0 | 30.0 | 0.67x "
        "| 40.0% | 20.0% | 2.500 / 2.600 |"
    )
    assert lines[3].startswith("| llama3_8b_qlora | not measured yet |") and len(lines) == 5


def test_readme_real_size_table_is_the_one_the_script_prints(bench):
    """The README's table has the columns ``--table`` prints, so measured rows paste in as they are."""
    header = bench.markdown_table({}).splitlines()[0]
    readme = (REPO / "README.md").read_text()
    assert header in readme
    for run in bench.RUNS:
        assert f"| {run} |" in readme.split(header, 1)[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runs", "llama3_70b_lora"], "--runs: unknown 'llama3_70b_lora'"),
        (["--arms", "unsloth"], "--arms: unknown 'unsloth'"),
        (["--steps", "5", "--warmup-steps", "5"], "--steps 5 must be larger than --warmup-steps 5"),
        (["--warmup-steps", "0"], "--warmup-steps must be at least 1"),
        (["--max-seq", "4096,2048"], "--max-seq: positive lengths in ascending order"),
        (["--max-seq", "4k"], "--max-seq: comma-separated integers"),
        (["--profile", "--max-seq", "4096"], "--profile and --max-seq are separate measurements"),
    ],
)
def test_bad_arguments_name_the_flag(bench, capsys, argv, message):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name, slug", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("cpu", "cpu")])
def test_gpu_slug(bench, name, slug):
    assert bench.gpu_slug(name) == slug


def test_max_seq_stops_at_the_first_length_out_of_memory(bench, monkeypatch, tmp_path):
    """Each length runs in turn until one raises OutOfMemoryError: that row says so and no longer length runs."""
    tried = []

    def fake_arm(run, arm, args, work):
        tried.append(args.seq_len)
        if args.seq_len >= 8192:
            raise bench.torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
        return {"tok_s": 1000.0, "peak_mib": args.seq_len / 100}

    monkeypatch.setattr(bench, "run_arm", fake_arm)
    results = bench.main(["--runs", "llama3_8b_lora", "--arms", "ours", "--max-seq", "2048,4096,8192,16384",
                          "--out", str(tmp_path)])
    assert tried == [2048, 4096, 8192]
    rows = results["rows"]
    assert [(r["seq_len"], r["fits"]) for r in rows] == [(2048, True), (4096, True), (8192, False)]
    assert rows[-1]["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    written = json.loads(next(tmp_path.glob("max_seq_*.json")).read_text())
    assert written["rows"] == rows


@pytest.mark.slow
def test_profile_mode_splits_two_steps_of_each_arm_by_kind(bench, tmp_path):
    """``--profile``: warmup + 2 steps per arm; each row's profile covers the 2 steps after the warmup, its kinds
    add up to its kernel time, and the file is ``step_profile_*`` (not the timed results)."""
    results = bench.main(["--smoke", "--runs", "llama3_8b_lora", "--warmup-steps", "1", "--profile",
                          "--out", str(tmp_path)])
    assert [p.name.split("_cpu_")[0] for p in tmp_path.iterdir()] == ["step_profile"]
    for row in results["rows"]:
        p = row["profile"]
        assert row["steps"] == 3 and p["steps"] == 2
        assert sum(p["by_kind"].values()) == pytest.approx(p["kernel_ms"])
        assert 0 < p["kernel_ms"] and 0 < p["wall_ms"] and len(p["top"]) > 0
        assert "gemm" in p["by_kind"] or "other" in p["by_kind"]


@pytest.mark.slow
def test_both_arms_follow_one_loss_curve(bench, tmp_path):
    """Same model, data, schedule and adapter init distribution: after 4 steps (the smoke's cap) the two arms' losses agree to
    within the run-to-run spread of different random adapter draws (far below what the recipe's default
    xavier init, which moves faster, gives against PEFT's kaiming)."""
    results = bench.main(["--smoke", "--runs", "llama3_8b_lora", "--steps", "4", "--out", str(tmp_path)])
    ours, peft = (r["losses"] for r in results["rows"])
    drop_ours, drop_peft = ours[0] - ours[-1], peft[0] - peft[-1]
    assert drop_ours > 0 and drop_peft > 0
    assert abs(drop_ours - drop_peft) < 0.25 * drop_peft, (ours, peft)


@pytest.mark.parametrize("name, kind", [
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_relu_bf16_32x32_128x1_tn_align8>", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("_tma_gemm_lora_kernel", "ours"),
    ("_tn2_kernel", "ours"),
    ("_rms_norm_forward_kernel", "norm"),
    ("triton_poi_fused__to_copy_add_lora_bwd_mean_mul_pow_rsqrt_silu_2", "inductor"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "other"),
    ("_liger_cross_entropy_kernel", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>", "optimizer"),
    ("void at::native::elementwise_kernel<128, 2, at::native::copy_>", "copy_cast"),
])
def test_kernel_kinds(name, kind):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from step_profile import kind_of
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert kind_of(name) == kind


def test_readme_max_seq_table_is_generated_from_the_committed_results(bench):
    """The README's longest-sequence table is what ``--table`` prints from the committed ``--max-seq`` file."""
    results = json.loads((REPO / "benchmarks" / "results" / "max_seq_h100_2026-12-06.json").read_text())
    assert bench.markdown_max_seq(results) in (REPO / "README.md").read_text()


def test_max_seq_table_names_the_longest_fit_and_the_first_out_of_memory(bench):
    rows = [{"run": "llama3_8b_lora", "arm": "ours", "seq_len": n, "fits": True, "peak_mib": n, "tok_s": 1000.0}
            for n in (4096, 8192)]
    rows += [{"run": "llama3_8b_lora", "arm": "peft_trainer", "seq_len": 4096, "fits": True, "peak_mib": 2048.0,
              "tok_s": 900.0},
             {"run": "llama3_8b_lora", "arm": "peft_trainer", "seq_len": 8192, "fits": False, "error": "OOM"}]
    lines = bench.markdown_max_seq({"gpu": "G", "date": "2026-12-06", "rows": rows}).splitlines()
    assert lines[2] == "| llama3_8b_lora | ours | G, 2026-12-06 | 8,192 | 8.0 | 1,000 | none tried |"
    assert lines[3] == "| llama3_8b_lora | peft_trainer | G, 2026-12-06 | 4,096 | 2.0 | 900 | 8,192 |"
    assert lines[4].startswith("| llama3_8b_qlora | ours | not measured yet |")
