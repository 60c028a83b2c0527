"""Section 2 of bench_lora.py: a 4-layer Llama (4096/14336, bf16, 2x2048 tokens), r=16 on the 7 projections,
one training step (forward, loss, backward) per variant, interleaved; throughput and peak memory against the
frozen model (its embedding trainable, so that backward runs through every layer)."""

from __future__ import annotations

import copy

import torch
from bench_common import DEV, interleaved, peak_delta_mib
from bench_variants import SHARED_TRITON, base_gemm_for
from torch import nn

from automodel_lora import PeftConfig, apply_lora_to_linear_modules

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(smoke: bool):
    """(LlamaConfig, batch size, sequence length): the 4-layer Llama, or a tiny one for --smoke."""
    from transformers import LlamaConfig

    if smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, vocab_size=256)
        return cfg, 2, 32
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=4, vocab_size=32000)
    return cfg, 2, 2048


def lora_model(base: nn.Module, r: int, use_triton: bool, recompute: bool = True) -> nn.Module:
    """A copy of ``base`` with automodel_lora adapters on PROJ (B drawn nonzero, so the adapters count)."""
    m = copy.deepcopy(base)
    apply_lora_to_linear_modules(m, PeftConfig(target_modules=PROJ, dim=r, alpha=2 * r, use_triton=use_triton,
                                               recompute_mlp_input=recompute))
    with torch.no_grad():
        for name, p_ in m.named_parameters():
            if "lora_B" in name:
                p_.normal_(0, 0.01)
    return m


def build_models(base: nn.Module, r: int, want: list[str]) -> dict:
    """Each variant's model: the frozen ``base`` itself (embedding trainable), HF PEFT's, ours."""
    base.model.embed_tokens.weight.requires_grad_(True)
    models = {"frozen": base}
    if "peft" in want:
        try:
            import peft

            models["peft"] = peft.get_peft_model(copy.deepcopy(base),
                                                 peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJ))
        except Exception as e:  # pragma: no cover
            print(f"peft unavailable: {e!r}")
    models["torch"] = lora_model(base, r, False)
    models["triton"] = lora_model(base, r, True)
    if "triton_no_recompute" in want:
        models["triton_no_recompute"] = lora_model(base, r, True, recompute=False)
    for name in SHARED_TRITON:
        if name in want:
            models[name] = models["triton"]  # same model, run under OPTION_CHANGES[name]
    return models


def run(args) -> dict:
    """{"model": one row per variant}: ms per step, tokens/s, peak memory (weights + step), ratios to frozen."""
    from transformers import LlamaForCausalLM

    dt = torch.bfloat16
    cfg, bsz, seq = llama_config(args.smoke)
    r = 16
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device=DEV, dtype=dt)
    base.requires_grad_(False)
    models = build_models(base, r, args.variants)
    ids = [torch.randint(0, cfg.vocab_size, (bsz, seq), device=DEV) for _ in range(2)]

    def make_step(name, m):
        def step(i):
            with base_gemm_for(name, m):
                m(input_ids=ids[i % 2], labels=ids[i % 2]).loss.backward()
        return step

    params = list({id(p_): p_ for m in models.values() for p_ in m.parameters() if p_.requires_grad}.values())

    def prep(i):
        for p_ in params:
            p_.grad = None

    steps = {k: make_step(k, m) for k, m in models.items()}
    n = 3 if args.smoke else 10
    times = interleaved(steps, n=n, rounds=args.rounds, warmup=2 if args.smoke else 3, prep=prep)
    mem = {k: peak_delta_mib(s, prep) for k, s in steps.items()}
    # total peak: the model's own weights + the step's delta
    wbytes = {k: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) / 2**20
              for k, m in models.items()}
    tok = bsz * seq
    rows = []
    for k in steps:
        rows.append(dict(variant=k, ms=times[k], tok_s=tok / times[k] * 1e3, thr_ratio=times["frozen"] / times[k],
                         step_peak_mib=mem[k], weights_mib=wbytes[k],
                         peak_total_mib=mem[k] + wbytes[k],
                         mem_ratio=(mem[k] + wbytes[k]) / (mem["frozen"] + wbytes["frozen"])))
        print(f"[model] {k}: {times[k]:.2f} ms/step, {tok / times[k] * 1e3:.0f} tok/s", flush=True)
    return {"model": rows}


def table(results: dict) -> list[str]:
    """The model table's lines (markdown)."""
    lines = ["\n## Model: 4-layer Llama (4096/14336), bf16, 2x2048 tokens, r=16 on 7 projections",
             "| variant | ms/step | tok/s | throughput vs frozen | peak MiB (weights + step) | memory vs frozen |",
             "|---|---|---|---|---|---|"]
    for row in results["model"]:
        lines.append(f"| {row['variant']} | {row['ms']:.2f} | {row['tok_s']:.0f} | {row['thr_ratio']:.3f}x | "
                     f"{row['peak_total_mib']:.0f} | {row['mem_ratio']:.3f}x |")
    return lines
