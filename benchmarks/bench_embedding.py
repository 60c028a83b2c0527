"""Section ``embedding`` of bench_lora.py: LoRA on an input embedding, forward + backward, bf16, vocab 128256 x
4096 (Llama-3), 2 x 2048 token ids, r = 16, interleaved in one run, ratio to the frozen embedding:

  frozen  ``nn.Embedding`` with its output requiring grad (backward runs, no weight gradient: what a frozen
          input embedding costs in a LoRA step)
  trained the same embedding with its table trained (the dense (vocab, dim) weight gradient: what full
          fine-tuning of the embedding costs)
  peft    HF PEFT ``LoraConfig(target_modules=["emb"])`` (its default fp32 adapters)
  torch   automodel_lora's PyTorch path (``use_triton=False``)
  triton  automodel_lora's fused lookup (``kernels/embedding_lora.py``)
The adapters are set identically everywhere (B nonzero); each output is checked against the torch path.
Two clocks per variant: the interleaved step (CUDA events; a lone op's step waits on its host work) and the
kernels' summed device time per step (what it costs inside a model step, where the host runs ahead).
"""

from __future__ import annotations

import copy

import torch
from bench_common import DEV, device_us_per_step, interleaved, kernel_profile, md_table, peak_delta_mib
from torch import nn

import automodel_lora as al

VOCAB, DIM, TOKENS, R = 128256, 4096, (2, 2048), 16
OUT_RTOL = 2**-6


class Holder(nn.Module):
    """The embedding as the submodule ``emb`` (what PEFT's ``target_modules`` names)."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.emb = emb

    def forward(self, ids):
        out = self.emb(ids)
        return out if out.requires_grad else out.requires_grad_(True)  # the frozen arm's backward runs too


def variants(smoke: bool) -> dict:
    vocab, dim = (300, 64) if smoke else (VOCAB, DIM)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    torch.manual_seed(0)
    base = nn.Embedding(vocab, dim, device=DEV, dtype=dtype).requires_grad_(False)
    out = {"frozen": Holder(base), "trained": Holder(copy.deepcopy(base).requires_grad_(True))}
    for name, use_triton in (("torch", False), ("triton", True)):
        emb = copy.deepcopy(base)
        al.patch_embedding_module(emb, dim=R, alpha=2 * R, use_triton=use_triton)
        out[name] = Holder(emb)
    with torch.no_grad():
        out["torch"].emb.lora_embedding_B.normal_(0, 0.02)
        out["torch"].emb.lora_embedding_A.normal_(0, 1.0)
        for k in ("triton",):
            out[k].emb.lora_embedding_A.copy_(out["torch"].emb.lora_embedding_A)
            out[k].emb.lora_embedding_B.copy_(out["torch"].emb.lora_embedding_B)
    try:
        import peft

        m = peft.get_peft_model(Holder(copy.deepcopy(base)), peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["emb"]))
        with torch.no_grad():
            m.base_model.model.emb.lora_embedding_A["default"].copy_(out["torch"].emb.lora_embedding_A)
            m.base_model.model.emb.lora_embedding_B["default"].copy_(out["torch"].emb.lora_embedding_B)
        out["peft"] = m
    except Exception as e:  # a peer's failure is reported; the others are still measured
        print(f"[embedding] peft unavailable: {type(e).__name__}: {e}", flush=True)
    return out


def run(args) -> dict:
    """{"embedding": one row per variant}."""
    arms = variants(args.smoke)
    vocab = arms["frozen"].emb.num_embeddings
    shape = (2, 32) if args.smoke else TOKENS
    g = torch.Generator(device=DEV).manual_seed(1)
    ids = [torch.randint(0, vocab, shape, device=DEV, generator=g) for _ in range(2)]
    grads = [torch.randn(*shape, arms["frozen"].emb.embedding_dim, device=DEV, generator=g).to(
        arms["frozen"].emb.weight.dtype) for _ in range(2)]
    with torch.no_grad():
        want = arms["torch"](ids[0]).float()
        diffs = {k: (m(ids[0]).float() - want).abs().max().item() for k, m in arms.items()}
    scale = want.abs().max().item()
    params = [p for m in arms.values() for p in m.parameters() if p.requires_grad]

    def prep(i):
        for p in params:
            p.grad = None

    steps = {k: (lambda m: lambda i: m(ids[i % 2]).backward(grads[i % 2]))(m) for k, m in arms.items()}
    times = interleaved(steps, n=args.n, rounds=args.rounds, warmup=args.warmup, prep=prep)
    rows = []
    for k, ms in times.items():
        ok = None if k in ("frozen", "trained") else diffs[k] <= OUT_RTOL * scale  # no adapter: no check
        rows.append(dict(variant=k, ms=ms, ratio=ms / times["frozen"], peak_mib=peak_delta_mib(steps[k], prep),
                         device_us=device_us_per_step(steps[k], prep=prep), out_max_diff=diffs[k], out_ok=ok,
                         vocab=vocab, tokens=ids[0].numel(), r=R))
        if k in args.profile:
            rows[-1]["profile"] = kernel_profile(steps[k], prep=prep)
            print(f"[embedding] profile of {k}:\n{rows[-1]['profile']}", flush=True)
        print(f"[embedding] {k}: {ms:.3f} ms, {ms / times['frozen']:.3f}x, max |diff| {diffs[k]:.3g}", flush=True)
    return {"embedding": rows}


def table(results: dict) -> list[str]:
    if not results.get("embedding"):
        return []
    frozen_us = next(r["device_us"] for r in results["embedding"] if r["variant"] == "frozen")
    rows = [[r["variant"], f"{r['ms']:.3f}", f"{r['ratio']:.3f}x", f"{r['device_us']:.1f}",
             f"{r['device_us'] / frozen_us:.2f}x", f"{r['peak_mib']:.0f}",
             f"{r['out_max_diff']:.3g}" + ("" if r["out_ok"] in (None, True) else " (DISAGREES)")]
            for r in results["embedding"]]
    return md_table("Embedding LoRA: fwd+bwd, r=16, ratio to the frozen embedding",
                    ["variant", "ms", "ratio", "GPU us (kernels)", "GPU ratio", "peak MiB", "max diff vs torch"],
                    rows)
