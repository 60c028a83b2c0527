"""HF PEFT's ``lora_bias`` (a bias ``b_B`` on lora_B) in the fused LoRA function of ``lora.py``.

PEFT computes ``base + lora_B(lora_A(drop(x))) * s``, so the bias is scaled by ``s`` like the rest:

    y = x W^T + b + s * (xa B^T + b_B)            "pre", or no dropout (p = 0, eval)
    y = x W^T + b + drop(s * (xa B^T + b_B))      "post" with p > 0 (this library's dropout position)

Shapes: b, b_B ``(N,)``; y, dy ``(M, N)``; the keep-mask ``(M, N)``.

Costs, and why:
  * no dropout on the bias (the first line): ``s * b_B`` is constant over rows, so it joins the bias
    the base GEMM's epilogue already adds (``expand``'s bias for ``lora_add``): the forward passes
    ``b + s * b_B`` (``s * b_B`` alone where the base has no bias), an ``(N,)`` op, and makes no pass
    over y.  Backward: ``d b_B = s * dy.sum(0)``, one reduction over dy (M * N reads), the only
    backward cost of the bias.
  * post-dropout with p > 0: the mask multiplies the bias term too, so it cannot join the base bias.
    The ``(M, N)`` keep-mask the kernels regenerate from the call's seed is materialised (the same
    Philox / reference stream, so the bias is dropped where the low-rank term is), in forward for
    ``y += drop(s * b_B)`` (one pass over y) and again in backward for ``d b_B = s * drop(dy).sum(0)``.
    Only training with ``dropout_position="post"`` and p > 0 pays this.

``lora_bias`` None (the default) costs nothing here: callers test it once.
"""

from __future__ import annotations

import torch


def check_lora_bias(lora_bias: torch.Tensor | None, N: int) -> None:
    """Raise unless ``lora_bias`` is None or a floating ``(N,)`` tensor (N: lora_B's out features)."""
    if lora_bias is None:
        return
    if not isinstance(lora_bias, torch.Tensor) or lora_bias.shape != (N,) or not lora_bias.is_floating_point():
        what = f"{tuple(lora_bias.shape)} {lora_bias.dtype}" if isinstance(lora_bias, torch.Tensor) else repr(lora_bias)
        raise ValueError(f"lora_bias must be a floating ({N},) tensor (the bias of lora_B, whose out features are "
                         f"{N}), got {what}; pass lora_B's bias, or None for an adapter without one")


def folded_bias(bias: torch.Tensor | None, lora_bias: torch.Tensor, scale: float,
                dtype: torch.dtype) -> torch.Tensor:
    """``b + s * b_B`` (``s * b_B`` where ``bias`` is None) ``(N,)`` in ``dtype``: summed in fp32, rounded once."""
    folded = lora_bias.float() * scale
    if bias is not None:
        folded += bias
    return folded.to(dtype)


@torch.library.custom_op("automodel_lora::post_keep_mask", mutates_args=())
def _post_keep_op(seed: torch.Tensor, M: int, N: int, p: float) -> torch.Tensor:
    from .backend import dropout_keep_mask  # backend.py imports this module (through dispatch.py)

    return dropout_keep_mask(seed, M, N, p, seed.device)


@_post_keep_op.register_fake
def _(seed, M, N, p):
    return seed.new_empty((M, N), dtype=torch.bool)


def post_keep(seed: torch.Tensor, M: int, N: int, p: float) -> torch.Tensor:
    """The ``(M, N)`` bool keep-mask of a post-dropout call: the one its kernels (or the reference) draw from
    ``seed``.  An opaque custom op under torch.compile (the reference mask reads the seed on the host)."""
    if torch.compiler.is_compiling():
        return _post_keep_op(seed, M, N, p)
    from .backend import dropout_keep_mask

    return dropout_keep_mask(seed, M, N, p, seed.device)


def add_dropped_bias_(y: torch.Tensor, keep: torch.Tensor, lora_bias: torch.Tensor, scale: float,
                      p: float) -> torch.Tensor:
    """``y += drop(s * b_B)`` in place (y ``(M, N)``, keep ``(M, N)`` bool); returns y."""
    y += keep * (lora_bias.float() * (scale / (1.0 - p))).to(y.dtype)
    return y


def lora_bias_grad(dy: torch.Tensor, scale: float, dtype: torch.dtype, keep: torch.Tensor | None = None,
                   p: float = 0.0) -> torch.Tensor:
    """``d b_B`` ``(N,)`` in ``dtype``: ``s * dy.sum(0)`` (``s * drop(dy).sum(0)`` with a post keep-mask),
    accumulated in fp32.  One reduction over dy ``(M, N)``."""
    if keep is not None:
        dy = torch.where(keep, dy, 0)
        scale = scale / (1.0 - p)
    return (dy.sum(0, dtype=torch.float32) * scale).to(dtype)
