"""DoRA and ``lora_bias`` adapters in a mixed batch (``adapter_batch``): what they change in each sequence's rows.

The block's kernels (or its PyTorch loop) give every row the plain LoRA sum; this module finishes the rows of
sequences whose adapter, on this module, is DoRA or has a ``lora_B`` bias:

    plain sum:  y_i = x_i W^T + b + s_k x_i A_k^T B_k^T                   k = the adapter of row i's sequence
    DoRA:       y_i = f_k * (y_i - b) + b                                 f_k = m_k / ||W + s_k B_k A_k||_row  (N,)
    lora_bias:  y_i = y_i + s_k c_k                                       c_k = adapter k's lora_B bias        (N,)

which is ``f_k * (x W^T + s_k x A_k^T B_k^T) + b`` (HF PEFT's DoRA, the norm detached) and ``x W^T + b + s_k (x A_k^T
B_k^T + c_k)`` (PEFT's ``lora_bias``). Sequences of the base model, of plain adapters, or of an adapter this module
does not have get ``f = 1`` and no shift. PEFT refuses DoRA with ``lora_bias`` on one adapter; so does this library,
so an adapter has one of the two at most.

Both are per-sequence vectors, applied over the ``(batch, rows per sequence, N)`` view of the output: one more
elementwise pass over ``y`` in the modules that have such an adapter in the batch; modules whose adapters are all
plain pay nothing. The tables (``(K + 1, N)``: one row per adapter of the block, the last for none) are built once
per block for calls without gradient, and per call with it (the magnitude and the bias are trained; the norm follows
``A`` and ``B``, which the optimizer changes between calls).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_slots import holder_of
from .dora import magnitude_of, row_norms


class Epilogue:
    """One adapted linear's DoRA scales and ``lora_bias`` shifts for the adapters of a block (``names``, in the
    block's row-id order; None: a free slot). ``active`` is False where no adapter of the block needs either."""

    def __init__(self, module: nn.Module, names: list):
        self.module = module
        self.holders = [None if n is None else holder_of(module, n) for n in names]
        self.dora = any(h is not None and magnitude_of(h) is not None for h in self.holders)
        self.shift = any(h is not None and h.lora_B.bias is not None for h in self.holders)
        self.active = self.dora or self.shift
        self._fixed: tuple | None = None  # (scales, shifts) for calls without gradient

    def clear(self) -> None:
        """Drop the tables built for calls without gradient (the weights may change before the next use)."""
        self._fixed = None

    def _tables(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scales (K + 1, N) fp32 or None, shifts (K + 1, N) fp32 or None); row K: the base model's sequences."""
        module, N = self.module, self.module.out_features
        ones = torch.ones(N, device=module.lora_A.weight.device, dtype=torch.float32)
        scales, shifts = [], []
        for h in self.holders:
            m = None if h is None else magnitude_of(h)
            if m is None:
                scales.append(ones)
            else:
                norm = row_norms(module, h.lora_A.weight, h.lora_B.weight, h.lora_settings.scale)  # detached
                scales.append(m.to(norm.dtype) / norm)
            bias = None if h is None else h.lora_B.bias
            shifts.append(ones * 0 if bias is None else bias.float() * h.lora_settings.scale)
        scales.append(ones)
        shifts.append(ones * 0)
        return (torch.stack(scales) if self.dora else None), (torch.stack(shifts) if self.shift else None)

    def __call__(self, y: torch.Tensor, seq_rows: torch.Tensor, grad: bool) -> torch.Tensor:
        """``y`` (..., N) with the rows of each sequence finished (module docstring); ``seq_rows`` (batch,) int64,
        each sequence's table row (K for none), on ``y``'s device. Returns a new tensor in ``y``'s dtype."""
        if grad:
            scales, shifts = self._tables()
        else:
            if self._fixed is None:
                with torch.no_grad():
                    self._fixed = self._tables()
            scales, shifts = self._fixed
        batch, N = seq_rows.numel(), y.shape[-1]
        out = y.reshape(batch, -1, N).float()  # (batch, rows per sequence, N)
        if scales is not None:
            f = scales[seq_rows][:, None, :]  # (batch, 1, N)
            bias = self.module.bias
            out = out * f if bias is None else (out - bias.float()) * f + bias.float()
        if shifts is not None:
            out = out + shifts[seq_rows][:, None, :]
        return out.to(y.dtype).view(y.shape)
