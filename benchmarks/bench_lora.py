"""LoRA layer / model benchmark (protocol: ../shared/BENCHMARK.md sections 1-3).

    python benchmarks/bench_lora.py                    # layer + ops + model, JSON to $OUT or benchmarks/results
    python benchmarks/bench_lora.py --sections layer   # just the layer table
    python benchmarks/bench_lora.py --smoke            # tiny shapes, any device (checks the script itself)

Variants, all on the same x, g and weights, interleaved step by step (A B C, B C A, ...), three
rounds, median of per-step CUDA-event times; ratios are to the frozen layer measured in the same run:
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
  triton_no_recompute  (model) the kernel path keeping down_proj's input from forward to backward
              (PeftConfig.recompute_mlp_input=False; every other LoRA variant recomputes it)
  triton_act_kept  (model) the kernel path with the recompute, but the MLP product as act_fn(g) * u
              (autograd keeps act(g) too; every other LoRA variant with the recompute runs silu_mul)

Model shapes (--model-shape, the model section): llama8b-4l (default: 4096/14336, 4 layers),
llama3.2-1b (2048/8192, 16 layers), qwen2.5-0.5b (896/4864, 24 layers); random weights.
Prints the table last; writes the full JSON (GPU, date, commit, autotune choices).

Sections (--sections, run in this order): layer, ops, host (bench_layer.py), qlora (bench_qlora.py),
model (bench_model.py); the timing harness is bench_common.py, the variants' kernel options bench_variants.py.
"""

from __future__ import annotations

import argparse

import bench_layer
import bench_model
import bench_qlora
from bench_common import DEV, run_env, write_results
from bench_variants import DEFAULT_OPTIONS

from automodel_lora import kernels as K

# name -> the section's run(args) -> its keys of the results JSON, in the order they run
SECTIONS = {"layer": bench_layer.run, "ops": bench_layer.run_ops, "host": bench_layer.run_host,
            "qlora": bench_qlora.run, "model": bench_model.run}


def _env():
    info = dict(run_env(), device=DEV, kernel_options_default=DEFAULT_OPTIONS.to_dict())
    try:
        import peft

        info["peft"] = peft.__version__
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
    print("\n".join(lines), flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="layer,ops,host,qlora,model")
    ap.add_argument("--variants", default="frozen,peft,torch_naive,torch,triton,triton_cublas")
    ap.add_argument("--M", type=int, default=8192)
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--qlora-shapes", default="4096x14336")
    ap.add_argument("--model-shape", default="llama8b-4l", choices=sorted(bench_model.MODEL_SHAPES))
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (script check, any device)")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_lora.json or benchmarks/results/)")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    args.ranks = [int(v) for v in args.ranks.split(",")]
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    args.qlora_shapes = [tuple(int(v) for v in s.split("x")) for s in args.qlora_shapes.split(",")]
    if args.smoke:
        args.M, args.shapes, args.ranks, args.n, args.rounds, args.warmup = 64, [(48, 40)], [4], 3, 1, 1
        args.qlora_shapes = [(64, 48)]
    return args


def main(argv=None):
    args = parse_args(argv)
    results = {"env": _env(), "args": {k: v for k, v in vars(args).items()}}
    secs = args.sections.split(",")
    for name, run in SECTIONS.items():
        if name in secs:
            results.update(run(args))
    if K.HAS_TRITON and DEV == "cuda":
        from automodel_lora.kernels.launch import autotune_choices

        results["autotune"] = autotune_choices()
    out = write_results(results, args.out)
    print(f"wrote {out}")
    print_tables(results)


if __name__ == "__main__":
    main()
