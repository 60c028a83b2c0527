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

Both are per-sequence vectors, applied over the ``(batch, rows per sequence, N)`` view of the output by one
autograd node (``_Finish``: the arithmetic in fp32, or fp64 for fp64 outputs; it keeps the plain sum, in its own
dtype, for the magnitude's gradient): one more elementwise pass over ``y`` in the modules where an adapter of the
batch needs it; modules whose batch adapters are all plain pay nothing. The tables (``(K + 1, N)``: one row per
adapter of the block, the last for none) are built per call with gradient (the magnitude and the bias are trained;
the norm follows ``A`` and ``B``) and, without it, once until a tensor they are made of changes (its version).
Adapter holders are looked up by name at each build: ``set_adapter`` moves adapters between holder objects.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_slots import holder_of
from .dora import magnitude_of, row_norms


class _Finish(torch.autograd.Function):
    """out = (y - b) * f + b + t over (batch, rows, N): f, t ``(batch, 1, N)`` or None, b ``(N,)`` or None."""

    @staticmethod
    def forward(ctx, y, f, t, b):
        acc = torch.promote_types(y.dtype, torch.float32)
        out = y.to(acc)
        if f is not None:
            out = out * f if b is None else (out - b.to(acc)) * f + b.to(acc)
        if t is not None:
            out = out + t
        ctx.save_for_backward(y if f is not None else None, f, b)
        ctx.has_t, ctx.t_dtype = t is not None, None if t is None else t.dtype
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, dout):
        y, f, b = ctx.saved_tensors
        acc = torch.promote_types(dout.dtype, torch.float32)
        g = dout.to(acc)
        dy = (g * f).to(dout.dtype) if f is not None else dout
        df = db = None
        if f is not None and ctx.needs_input_grad[1]:
            z = y.to(acc) if b is None else y.to(acc) - b.to(acc)
            df = (g * z).sum(1, keepdim=True).to(f.dtype)  # (batch, 1, N)
        if b is not None and ctx.needs_input_grad[3]:
            db = (g * (1 - f)).sum((0, 1)).to(b.dtype)
        dt = g.sum(1, keepdim=True).to(ctx.t_dtype) if ctx.has_t and ctx.needs_input_grad[2] else None
        return dy, df, dt, db


def _tensors(h: nn.Module | None) -> tuple:
    return () if h is None else tuple(t for t in (h.lora_A.weight, h.lora_B.weight, h.lora_B.bias, magnitude_of(h))
                                      if t is not None)


class Epilogue:
    """One adapted linear's DoRA scales and ``lora_bias`` shifts for the adapters of a block (``names``, in the
    block's row-id order; None: a free slot or an adapter no sequence of the batch takes). ``active`` is False
    where no such adapter needs either."""

    def __init__(self, module: nn.Module, names: list):
        self.module, self.names = module, list(names)
        holders = [self._holder(n) for n in self.names]
        self.dora = any(h is not None and magnitude_of(h) is not None for h in holders)
        self.shift = any(h is not None and h.lora_B.bias is not None for h in holders)
        self.active = self.dora or self.shift
        self._fixed: tuple | None = None  # (key, scales, shifts) for calls without gradient

    def _holder(self, name: str | None) -> nn.Module | None:
        return None if name is None else holder_of(self.module, name)

    def clear(self) -> None:
        """Drop the tables built for calls without gradient."""
        self._fixed = None

    def _tables(self, holders: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scales (K + 1, N) or None, shifts (K + 1, N) or None), fp32 (fp64 for fp64 adapters); row K: none."""
        module = self.module
        zero = torch.zeros(module.out_features, device=module.lora_A.weight.device,
                           dtype=torch.promote_types(module.lora_A.weight.dtype, torch.float32))

        def scale(h):  # f = m / ||W + s B A||_row, the norm detached; 1 without a magnitude
            m = None if h is None else magnitude_of(h)
            if m is None:
                return zero + 1
            norm = row_norms(module, h.lora_A.weight, h.lora_B.weight, h.lora_settings.scale)
            return (m.to(norm.dtype) / norm).to(zero.dtype)

        def shift(h):  # s c, or 0 without a lora_B bias
            bias = None if h is None else h.lora_B.bias
            return zero if bias is None else bias.to(zero.dtype) * h.lora_settings.scale

        scales = torch.stack([scale(h) for h in holders] + [zero + 1]) if self.dora else None
        shifts = torch.stack([shift(h) for h in holders] + [zero]) if self.shift else None
        return scales, shifts

    def __call__(self, y: torch.Tensor, seq_rows: torch.Tensor, grad: bool) -> torch.Tensor:
        """``y`` (..., N) with the rows of each sequence finished (module docstring); ``seq_rows`` (batch,) int64,
        each sequence's table row (K for none), on ``y``'s device. Returns a new tensor in ``y``'s dtype."""
        holders = [self._holder(n) for n in self.names]
        if grad:
            scales, shifts = self._tables(holders)
        else:
            key = tuple((id(t), t._version) for h in holders for t in _tensors(h))
            if self._fixed is None or self._fixed[0] != key:
                with torch.no_grad():
                    self._fixed = (key, *self._tables(holders))
            scales, shifts = self._fixed[1:]
        batch, N = seq_rows.numel(), y.shape[-1]
        f = None if scales is None else scales[seq_rows][:, None, :]  # (batch, 1, N)
        t = None if shifts is None else shifts[seq_rows][:, None, :]
        bias = self.module.bias if f is not None else None
        return _Finish.apply(y.reshape(batch, -1, N), f, t, bias).view(y.shape)
