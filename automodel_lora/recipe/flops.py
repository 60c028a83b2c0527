"""Model flops per token and MFU (model flops utilisation) of a LoRA training step.

The count follows PaLM (Chowdhery et al. 2022, appendix B) and Chinchilla (Hoffmann et al. 2022,
appendix F): a product of an ``[m, k]`` by a ``[k, n]`` matrix costs ``2 m k n`` flops, so per
token a weight matrix of ``P`` entries costs ``2P`` in the forward, ``2P`` for the gradient of its
input and ``2P`` for the gradient of the weight. Attention's two products (``Q K^T`` and
``softmax(.) V``) cost ``2 * 2 * T * d_attn`` per token and layer in the forward at sequence length
``T`` (``d_attn = heads x head_dim``), three times that with the backward: PaLM's
``12 * L * H * Q * T``, counted over the full ``T x T`` square as PaLM does (no causal halving).

LoRA changes one term, and this module takes the convention that follows from it::

    flops/token = 4 * N_frozen + 6 * N_adapter + 12 * L * d_attn * T

- ``N_frozen``: every weight matrix a token passes through, frozen: q/k/v/o and gate/up/down of
  every layer and the output head (the input embedding is a lookup; norms, biases and the
  activation are elementwise and, as in PaLM, not counted). A frozen weight needs no weight
  gradient, so it costs ``4P``, not ``6P``.
- ``N_adapter``: the trainable (adapter) parameters: ``6P`` each, as in full training.
- Recomputation under gradient checkpointing is not counted: MFU counts the flops the model
  needs, not those the hardware ran (that is HFU), so checkpointing lowers MFU, as it should.

Why not ``6N`` for the whole model, as full fine-tuning counts: it credits a LoRA run with the
``2 N_frozen`` flops per token of weight gradients it never computes, 1.5x more MFU on the
matmul part for no work done. The input gradient of the first layer, which nothing needs, is
counted anyway (less than ``1/L`` of the total; no implementation is charged for skipping it).

For scale (arithmetic, not a measurement): Llama-3.1-8B with r=16 on all 7 projections at
T=2048 has ``N_frozen`` = 7.50e9 and ``N_adapter`` = 41.9e6, so ``4 * 7.50e9 + 6 * 41.9e6 +
12 * 32 * 4096 * 2048`` = 33.5e9 flops/token; 100% MFU on one 989-TFLOP/s GPU is ~29.5k tokens/s.

MFU = flops/token x tokens/s / (bf16 dense peak per GPU x GPUs). The peaks are the vendors'
published dense (no sparsity) bf16 tensor-core figures, looked up by device name; for an
unknown GPU or the CPU the MFU is omitted (None), never guessed.
"""

from __future__ import annotations

import torch

__all__ = ["PEAK_BF16_FLOPS", "matmul_params", "train_flops_per_token", "peak_bf16_flops", "mfu"]

# Dense bf16 tensor-core peaks (flop/s) by a substring of torch.cuda.get_device_name(); the first
# match wins, so the PCIe / NVL parts come before the plain name (the SXM part).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("A100", 312e12),
)

# Decoders whose every layer is q/k/v/o attention plus a gated MLP (gate/up/down), the shape
# `matmul_params` counts. Others (MoE, fused or non-gated MLPs) get no MFU rather than a wrong one.
_GATED_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def matmul_params(config) -> int | None:
    """Entries of the weight matrices a token passes through (``N_frozen`` above), from a HF config.

    Args:
        config: A ``PretrainedConfig`` of a dense gated decoder (Llama, Mistral, Qwen2/3, Gemma).

    Returns:
        ``L * (d*(h + 2 kv)*hd + h*hd*d + 3*d*I) + d*V``, or None for an architecture this count
        does not describe (another ``model_type``, or a mixture of experts).
    """
    if getattr(config, "model_type", None) not in _GATED_DECODERS or any(getattr(config, k, None) for k in _MOE_KEYS):
        return None
    d, n_layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    attn = d * (heads + 2 * kv_heads) * head_dim + heads * head_dim * d  # q, k, v, o
    mlp = 3 * d * config.intermediate_size  # gate, up, down
    return n_layers * (attn + mlp) + d * vocab  # + the output head


def train_flops_per_token(config, seq_len: int, n_adapter_params: int) -> float | None:
    """Model flops of one training token of a LoRA run (see the module docstring for the convention).

    Args:
        config: The model's HF config.
        seq_len: Tokens per training sequence (``T`` of the attention term).
        n_adapter_params: Trainable parameters (the adapters), counted on the unsharded model.

    Returns:
        ``4 * N_frozen + 6 * N_adapter + 12 * L * d_attn * T``, or None where
        :func:`matmul_params` does not know the architecture.
    """
    n_frozen = matmul_params(config)
    if n_frozen is None:
        return None
    heads = config.num_attention_heads
    d_attn = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 4.0 * n_frozen + 6.0 * n_adapter_params + 12.0 * config.num_hidden_layers * d_attn * seq_len


def peak_bf16_flops(device: torch.device | str) -> float | None:
    """The dense bf16 peak (flop/s) of one ``device`` from :data:`PEAK_BF16_FLOPS`; None for the CPU
    or a GPU not in the table."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def mfu(flops_per_token: float | None, tokens_per_s: float, peak: float | None, n_devices: int = 1) -> float | None:
    """Model flops utilisation in [0, 1]: ``flops_per_token * tokens_per_s / (peak * n_devices)``.

    ``tokens_per_s`` is the whole run's rate over its ``n_devices`` GPUs. None when the flop count
    or the peak is unknown."""
    if flops_per_token is None or peak is None:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)
