"""LoRA layer / model benchmark (protocol: ../shared/BENCHMARK.md sections 1-4).

    python benchmarks/bench_lora.py                    # layer + ops + host + qlora + model, JSON to $OUT or benchmarks/results
    python benchmarks/bench_lora.py --sections layer   # just the layer table
    python benchmarks/bench_lora.py --sections model --model-shapes 1b,0.5b --rounds 2
    python benchmarks/bench_lora.py --smoke            # tiny shapes, any device (checks the script itself)

Layer and QLoRA variants (--variants), all on the same x, g and weights, interleaved step by step (A B C,
B C A, ...), three rounds, median of per-step times; ratios are to the frozen layer measured in the same run.
The layer is timed twice: GPU time (CUDA events, the host running ahead: ``ratio``) and the host's wall time
of each step synchronized (``ratio_sync``):
  frozen      plain frozen nn.Linear (the floor)
  peft        HF PEFT LoraConfig on the same linear, its defaults (fp32 adapters)
  torch_naive F.linear(x, W, b) + s * F.linear(F.linear(x, A), B), bf16 adapters
  torch       automodel_lora LinearLoRA (use_triton=False): the project's PyTorch path
  triton      automodel_lora kernels, the default base GEMM ("auto": on Hopper a Triton TMA GEMM that
              takes the low-rank term as an extra K step) + Triton skinny kernels
  triton_cublas  the same kernels with the cuBLAS base GEMM (low-rank term through beta=1;
              KernelOptions(base_gemm="cublas"))
  triton_tma  the same kernels with the Triton base GEMM forced (the TMA GEMM on Hopper;
              KernelOptions(base_gemm="triton"))
  triton_proj_pass  the default kernels with a proj pass over x / dy before the TMA GEMM instead of
              xa / dyB made inside it (KernelOptions(fuse_proj=False))
  peft_dora / torch_dora / triton_dora / axolotl_dora  DoRA (use_dora): HF PEFT's, automodel_lora's
              PyTorch layer, its fused layer (DESIGN.md section 10), PEFT's layer (bf16 adapters) through axolotl's
              LoRA_O node with its norm recomputed each step; errors against fp32 DoRA, with the magnitude's (dm)
Model arms (--model-variants; bench_model_arms.py): frozen, triton, peft, peft_bf16 (PEFT, bf16 adapters),
axolotl (PEFT + axolotl's LoRA_MLP / LoRA_QKV / LoRA_O; needs axolotl on the path and CUDA); optional torch,
triton_no_recompute (PeftConfig.recompute_mlp_input=False), axolotl_o and the triton_* option variants;
frozen_graphed and triton_graphed (default too) replay their arm's step as a CUDA graph (GraphedStep).
Model shapes (--model-shapes; bench_model_shapes.py): 8b (4-layer Llama-3-8B widths), 1b (Llama-3.2-1B),
0.5b (Qwen2.5-0.5B). --model-base nf4: the 7 projections of the base in bitsandbytes NF4 (the QLoRA protocol),
every arm built on that base.
Prints the table last; writes the full JSON (GPU, date, commit, autotune choices), and after each section
(and each model shape) the results so far, with "partial": true, at the same path.

Sections (--sections, run in this order): layer, ops, host (bench_layer.py), qlora (bench_qlora.py),
model (bench_model.py), moe (bench_moe.py: one MoE experts layer, --moe-shapes qwen3_30b,mixtral,
--moe-variants frozen,peft,torch,triton), multi (bench_multi.py: many adapters in one batch), embedding
(bench_embedding.py: LoRA on a 128256 x 4096 input embedding); multi and embedding are not in the default
list; the timing harness is bench_common.py, the variants' kernel options bench_variants.py.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import bench_embedding
import bench_layer
import bench_model
import bench_model_shapes
import bench_moe
import bench_multi
import bench_qlora
from bench_common import DEV, run_env, write_results
from bench_model_arms import DEFAULT_ARMS, OPTIONAL_ARMS
from bench_variants import DEFAULT_OPTIONS

from automodel_lora import kernels as K

# name -> the section's run(args) -> its keys of the results JSON, in the order they run
SECTIONS = {"layer": bench_layer.run, "ops": bench_layer.run_ops, "host": bench_layer.run_host,
            "qlora": bench_qlora.run, "model": bench_model.run, "moe": bench_moe.run,
            "multi": bench_multi.run, "embedding": bench_embedding.run}


def _env():
    info = dict(run_env(), device=DEV, kernel_options_default=DEFAULT_OPTIONS.to_dict())
    for name in ("peft", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            pass
    return info


def print_tables(results):
    lines = []
    if "layer" in results:
        lines += bench_layer.table(results)
    if "model" in results:
        lines += bench_model.table(results)
    lines += bench_qlora.table(results)
    lines += bench_moe.table(results)
    lines += bench_multi.table(results)
    lines += bench_embedding.table(results)
    print("\n".join(lines), flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="layer,ops,host,qlora,model,moe")
    ap.add_argument("--variants", default="frozen,peft,torch_naive,torch,triton,triton_cublas")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--qlora-shapes", default="4096x14336")
    ap.add_argument("--model-shapes", default=",".join(bench_model_shapes.SHAPES),
                    help=f"model section: decoders to run, of {list(bench_model_shapes.SHAPES)}")
    ap.add_argument("--model-variants", default=",".join(DEFAULT_ARMS),
                    help=f"model section: arms, of {DEFAULT_ARMS + OPTIONAL_ARMS}")
    ap.add_argument("--model-n", type=int, default=10, help="model section: steps per arm per round")
    ap.add_argument("--model-base", choices=["bf16", "nf4"], default="bf16",
                    help="model section: the base's projections in bf16, or NF4 (bitsandbytes Linear4bit: QLoRA)")
    ap.add_argument("--moe-shapes", default=",".join(bench_moe.SHAPES), help=f"moe section: of {list(bench_moe.SHAPES)}")
    ap.add_argument("--moe-variants", default=",".join(bench_moe.VARIANTS), help=f"moe section: of {bench_moe.VARIANTS}")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (script check, any device)")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_lora.json or benchmarks/results/; "
                    "--smoke: the system's temporary directory)")
    ap.add_argument("--profile", default="", help="layer, multi, model and embedding sections: comma-separated "
                    "variants / arms whose step is also profiled per kernel (torch.profiler's table, printed and kept in "
                    "the JSON)")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    args.profile = [v for v in args.profile.split(",") if v]
    args.model_shapes = args.model_shapes.split(",")
    args.model_variants = args.model_variants.split(",")
    args.moe_shapes, args.moe_variants = args.moe_shapes.split(","), args.moe_variants.split(",")
    args.ranks = [int(v) for v in args.ranks.split(",")]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.qlora_shapes = [tuple(int(v) for v in s.split("x")) for s in args.qlora_shapes.split(",")]
    if args.smoke:
        args.M, args.shapes, args.ranks, args.n, args.rounds, args.warmup = 64, [(48, 40)], [4], 3, 1, 1
        args.qlora_shapes = [(64, 48)]
        if args.out is None and not os.environ.get("OUT"):  # a script check's figures are no result to keep
            args.out = os.path.join(tempfile.gettempdir(), "bench_lora_smoke.json")
    return args


def main(argv=None) -> dict:
    """Run the sections ``argv`` asks for; writes the JSON, prints the tables, returns the results."""
    args = parse_args(argv)
    results = {"env": _env(), "args": {k: v for k, v in vars(args).items()}}
    secs = args.sections.split(",")

    def checkpoint(section_results: dict):
        """What has run so far at the output path, so that a run cut short keeps it."""
        write_results(dict(results, **section_results, partial=True), args.out)

    args.checkpoint = checkpoint
    for name, run in SECTIONS.items():
        if name in secs:
            results.update(run(args))
            checkpoint({})
    del args.checkpoint
    if K.HAS_TRITON and DEV == "cuda":
        from automodel_lora.kernels.launch import autotune_choices

        results["autotune"] = autotune_choices()
    out = write_results(results, args.out)
    print(f"wrote {out}")
    print_tables(results)
    return results


if __name__ == "__main__":
    main()
