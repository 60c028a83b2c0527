#!/usr/bin/env bash
# The finetune recipe on a GPU machine: correctness and speed of the runs a user makes first.
#
#   bash scripts/gpu_recipe_check.sh           # on the GPU machine, from anywhere in the repo
#   bash scripts/gpu_recipe_check.sh --smoke   # no GPU: the same runs, tiny and short, on the CPU
#
# Runs, each through scripts/finetune.py (or torchrun):
#   quickstart       configs/quickstart.yaml as shipped (Triton LoRA kernels, bf16 autocast)
#   qlora-85m        a 12-layer, hidden-768 Llama (~85M params) built in process, NF4 4-bit base
#                    (bitsandbytes), bf16 compute, fp32 adapters
#   lora-85m-1gpu    the same model with a bf16 base, one GPU: the reference for the next run
#   lora-85m-fsdp2   the same on 2 GPUs with FSDP2 over NCCL, same global batch (only with >= 2 GPUs)
# and checks: every run's validation loss ends below the untrained model's; the FSDP2 losses
# match the 1-GPU ones (bf16 tolerance). The final table gives tokens/s (median over the steps
# after the first 5, all ranks together) and peak GPU memory (torch.cuda.max_memory_allocated,
# rank 0). Results also go to $OUT/gpu_recipe_check.json when $OUT is set.
#
# bitsandbytes: when it does not import and .whl/bitsandbytes-*.whl exists (see
# ../shared/GPU.md for fetching the wheel), it is installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1  # never NVLink multicast on shared hosts
RUNS=${RECIPE_CHECK_DIR:-outputs/gpu_recipe_check}
rm -rf "$RUNS" && mkdir -p "$RUNS"

if ! "$PY" -c "import bitsandbytes" 2>/dev/null && compgen -G ".whl/bitsandbytes-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "[check] python $("$PY" -c 'import sys; print(sys.version.split()[0])'), $NGPU GPU(s), smoke=$SMOKE"
"$PY" -c "import torch, transformers; print('[check] torch', torch.__version__, '| transformers', transformers.__version__)"
"$PY" -c "from automodel_lora.kernels import HAS_TRITON; print('[check] Triton kernels available:', HAS_TRITON)"

# ~85M-parameter Llama over the byte tokenizer (the quickstart data); --smoke: a 2-layer toy.
if [[ $SMOKE == 1 ]]; then
    DEVICE=(train.device=cpu)
    MODEL85=(model.tiny.hidden_size=64 model.tiny.intermediate_size=128 model.tiny.num_hidden_layers=2
        model.tiny.num_attention_heads=4 model.tiny.num_key_value_heads=2)
    SIZE=(data.seq_len=64 train.max_steps=8 train.eval_every=0 train.eval_max_batches=2 train.log_every=4)
    COMPUTE=float32 GPUS_FOR_FSDP2=2 BACKEND=gloo
else
    DEVICE=()
    MODEL85=(model.tiny.hidden_size=768 model.tiny.intermediate_size=2048 model.tiny.num_hidden_layers=12
        model.tiny.num_attention_heads=12 model.tiny.num_key_value_heads=4 model.tiny.max_position_embeddings=1024)
    SIZE=(data.seq_len=512 train.max_steps=100 train.eval_every=0 train.eval_max_batches=16 train.log_every=20)
    COMPUTE=bfloat16 GPUS_FOR_FSDP2=$NGPU BACKEND=nccl
fi
COMMON=(checkpoint.resume=null checkpoint.save_every=0 train.lr=1e-3 train.warmup_steps=10 peft.lora_dtype=float32
    train.eval_batch_size=4)  # one eval batch size for 1 and 2 processes: the same validation sequences

FAILED=()
run_case() {  # run_case NAME PROCS ARGS... : one recipe run into $RUNS/NAME, its log in $RUNS/NAME.log
    local name=$1 procs=$2
    shift 2
    local launch=("$PY" scripts/finetune.py)
    [[ $procs -gt 1 ]] && launch=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$procs" scripts/finetune.py)
    echo "[check] $name: ${launch[*]} $*"
    rm -rf "${RUNS:?}/$name"  # this script's own scratch run: each check starts fresh (a run refuses another's directory)
    if "${launch[@]}" "$@" checkpoint.output_dir="$RUNS/$name" >"$RUNS/$name.log" 2>&1; then
        grep -E '^\[(model|done)\] (Llama|train|val)' "$RUNS/$name.log" | sed "s/^/    /"
    else
        echo "[check] $name FAILED; the end of its log:"
        tail -n 25 "$RUNS/$name.log"
        FAILED+=("$name")
    fi
}

QUICK=(--config configs/quickstart.yaml peft.use_triton=true checkpoint.resume=null)
[[ $SMOKE == 1 ]] && QUICK+=("${DEVICE[@]}" train.max_steps=10 data.seq_len=64 train.eval_every=0 train.eval_max_batches=2)
run_case quickstart 1 "${QUICK[@]}"

if "$PY" -c "import bitsandbytes" 2>/dev/null; then
    run_case qlora-85m 1 --config configs/quickstart.yaml "${MODEL85[@]}" "${SIZE[@]}" "${COMMON[@]}" "${DEVICE[@]}" \
        model.dtype=$COMPUTE quantization.load_in_4bit=true quantization.bnb_4bit_compute_dtype=$COMPUTE train.batch_size=8
else
    echo "[check] qlora-85m SKIPPED: bitsandbytes does not import (carry its wheel in .whl/)"
    FAILED+=("qlora-85m(skipped)")
fi

LORA85=(--config configs/quickstart.yaml "${MODEL85[@]}" "${SIZE[@]}" "${COMMON[@]}" "${DEVICE[@]}" model.dtype=$COMPUTE)
run_case lora-85m-1gpu 1 "${LORA85[@]}" train.batch_size=8
if [[ $GPUS_FOR_FSDP2 -ge 2 ]]; then
    run_case lora-85m-fsdp2 2 "${LORA85[@]}" train.batch_size=4 distributed.strategy=fsdp2 distributed.backend=$BACKEND
else
    echo "[check] lora-85m-fsdp2 SKIPPED: needs 2 GPUs, this machine has $NGPU"
fi

"$PY" - "$RUNS" "${OUT:-}" <<'PYTHON'
"""Correctness checks and the final table, from each run's summary.json and metrics.jsonl."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

runs, out = Path(sys.argv[1]), sys.argv[2]
rows, problems = [], []
for name in ("quickstart", "qlora-85m", "lora-85m-1gpu", "lora-85m-fsdp2"):
    summary_path = runs / name / "summary.json"
    if not summary_path.is_file():
        continue
    s = json.loads(summary_path.read_text())
    steps = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    tok_s = statistics.median(r["tokens_per_s"] for r in steps[5:] or steps)
    if not s["val_loss_after"] < s["val_loss_before"]:
        problems.append(f"{name}: val loss {s['val_loss_before']:.4f} -> {s['val_loss_after']:.4f} did not fall")
    rows.append(
        {
            "run": name,
            "procs": s["world_size"],
            "strategy": s["strategy"],
            "steps": s["steps"],
            "tokens_per_s": tok_s,
            "peak_mem_gb": s.get("peak_mem_gb"),
            "loss_first": s["first_loss"],
            "loss_last": s["last_loss"],
            "val_before": s["val_loss_before"],
            "val_after": s["val_loss_after"],
            "wall_s": s["wall_time_s"],
            "losses": {r["step"]: r["loss"] for r in steps},
        }
    )
by_name = {r["run"]: r for r in rows}
if "lora-85m-fsdp2" in by_name and "lora-85m-1gpu" in by_name:
    one, two = by_name["lora-85m-1gpu"]["losses"], by_name["lora-85m-fsdp2"]["losses"]
    rel = max(abs(two[k] - one[k]) / abs(one[k]) for k in one)
    f1, f2 = by_name["lora-85m-1gpu"]["loss_first"], by_name["lora-85m-fsdp2"]["loss_first"]
    rel_first = abs(f2 - f1) / abs(f1)
    by_name["lora-85m-fsdp2"]["max_rel_loss_diff_vs_1gpu"] = rel
    by_name["lora-85m-fsdp2"]["rel_first_loss_diff_vs_1gpu"] = rel_first
    print(f"[check] FSDP2 (2 procs) vs 1 process, same global batch: first-step loss differs by {rel_first:.2e}, "
          f"later logged losses by up to {rel:.2e} (relative)")
    # The math is the same (the CPU fp32 test agrees to ~1e-7). In bf16 the two runs round differently
    # (micro-batch 4 vs 8 picks other GEMM kernels; the gradient all-reduce sums in another order), so step 1
    # agrees to bf16 precision and 100 steps of training amplify that: 2.4e-2 seen on 2 x H200.
    if rel_first > 5e-3 or rel > 5e-2:
        problems.append(f"lora-85m-fsdp2: losses differ from the 1-process run: first step {rel_first:.2e} "
                        f"(limit 5e-3), later up to {rel:.2e} (limit 5e-2)")

try:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:  # the table matters more than the name
    device = "?"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(f"\n[check] {device}, commit {commit or '?'}")
header = f"{'run':<16} {'procs':>5} {'strategy':>8} {'steps':>5} {'tokens/s':>10} {'peak GB':>8} {'loss first->last':>17} {'val before->after':>18} {'wall s':>7}"
print(header)
print("-" * len(header))
for r in rows:
    mem = f"{r['peak_mem_gb']:.2f}" if r["peak_mem_gb"] is not None else "-"
    print(
        f"{r['run']:<16} {r['procs']:>5} {r['strategy']:>8} {r['steps']:>5} {r['tokens_per_s']:>10,.0f} {mem:>8} "
        f"{r['loss_first']:>8.3f}->{r['loss_last']:<7.3f} {r['val_before']:>8.3f}->{r['val_after']:<8.3f} {r['wall_s']:>7.1f}"
    )
for r in rows:
    r.pop("losses")
result = {"device": device, "commit": commit, "runs": rows, "problems": problems}
if out:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu_recipe_check.json").write_text(json.dumps(result, indent=2) + "\n")
(runs / "results.json").write_text(json.dumps(result, indent=2) + "\n")
for p in problems:
    print(f"[check] PROBLEM: {p}")
sys.exit(1 if problems else 0)
PYTHON
status=$?
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "[check] not run or failed: ${FAILED[*]}"
    status=1
fi
exit $status
