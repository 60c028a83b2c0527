"""Section 2 of bench_lora.py: a decoder (default a 4-layer Llama, 4096/14336; ``--model-shape``), bf16, 2x2048
tokens, r=16 on the 7 projections, one training step (forward, loss, backward) per variant, interleaved;
throughput and peak memory against the frozen model (its embedding trainable, so that backward runs through
every layer).

Model variants beside the layer section's: ``triton_no_recompute`` (down_proj's input kept from forward,
``recompute_mlp_input=False``) and ``triton_act_kept`` (the recompute, with the MLP product computed as
``act_fn(g) * u`` so that autograd keeps act(g) too: the product before ``silu_mul``)."""

from __future__ import annotations

import copy

import torch
from bench_common import DEV, interleaved, peak_delta_mib
from bench_variants import SHARED_TRITON, base_gemm_for
from torch import nn

from automodel_lora import PeftConfig, apply_lora_to_linear_modules
from automodel_lora.recompute import GatedMLPRecompute

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# --model-shape: name -> (transformers config class, its fields). Real models' shapes, random weights.
MODEL_SHAPES = {
    "llama8b-4l": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                       num_key_value_heads=8, num_hidden_layers=4, vocab_size=32000)),
    "llama3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                                        num_key_value_heads=8, head_dim=64, num_hidden_layers=16, vocab_size=128256,
                                        tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                                         num_key_value_heads=2, num_hidden_layers=24, vocab_size=151936,
                                         tie_word_embeddings=True, rope_theta=1000000.0)),
}
ACT_KEPT = "triton_act_kept"


def model_config(shape: str, smoke: bool):
    """(transformers config, batch size, sequence length): ``MODEL_SHAPES[shape]``, or a tiny Llama for --smoke."""
    import transformers

    if smoke:
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=2, num_hidden_layers=2, vocab_size=256)
        return cfg, 2, 32
    if shape not in MODEL_SHAPES:
        raise ValueError(f"--model-shape must be one of {sorted(MODEL_SHAPES)}, got {shape!r}")
    cls, fields = MODEL_SHAPES[shape]
    return getattr(transformers, cls)(**fields), 2, 2048


def keep_act_product(model: nn.Module) -> int:
    """Give every swapped MLP's ``act_fn`` a subclass of its own class (the same forward), which ``silu_mul`` does
    not take (it matches activations by exact class): those MLPs compute ``act_fn(g) * u`` and autograd keeps
    act(g) as well. Returns the count."""
    count = 0
    for module in model.modules():
        if isinstance(module, GatedMLPRecompute):
            cls = type(module.act_fn)
            if cls not in _KEPT_CLASSES:
                _KEPT_CLASSES[cls] = type(f"Kept{cls.__name__}", (cls,), {})
            module.act_fn.__class__ = _KEPT_CLASSES[cls]
            count += 1
    return count


_KEPT_CLASSES: dict[type, type] = {}  # an activation class -> its subclass for keep_act_product


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
    if ACT_KEPT in want:
        models[ACT_KEPT] = lora_model(base, r, True)
        if not keep_act_product(models[ACT_KEPT]):
            raise ValueError(f"{ACT_KEPT}: this model has no MLP switched by recompute_mlp_input")
    for name in SHARED_TRITON:
        if name in want:
            models[name] = models["triton"]  # same model, run under OPTION_CHANGES[name]
    return models


def run(args) -> dict:
    """{"model": one row per variant, "model_shape": the --model-shape}: ms per step, tokens/s, peak memory
    (weights + step), ratios to frozen."""
    from transformers import AutoModelForCausalLM

    dt = torch.bfloat16
    cfg, bsz, seq = model_config(args.model_shape, args.smoke)
    r = 16
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).to(device=DEV, dtype=dt)
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
    return {"model": rows, "model_shape": "smoke" if args.smoke else args.model_shape}


def table(results: dict) -> list[str]:
    """The model table's lines (markdown)."""
    shape = results.get("model_shape", "llama8b-4l")
    lines = [f"\n## Model: {shape}, bf16, 2x2048 tokens, r=16 on 7 projections",
             "| variant | ms/step | tok/s | throughput vs frozen | peak MiB (weights + step) | memory vs frozen |",
             "|---|---|---|---|---|---|"]
    for row in results["model"]:
        lines.append(f"| {row['variant']} | {row['ms']:.2f} | {row['tok_s']:.0f} | {row['thr_ratio']:.3f}x | "
                     f"{row['peak_total_mib']:.0f} | {row['mem_ratio']:.3f}x |")
    return lines
