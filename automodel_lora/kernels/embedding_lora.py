"""LoRA on an embedding, fused: the lookup, the adapter term and the add in one forward kernel.

    forward:   y[t]     = base[t] + c * a_t B^T          a_t = A[:, x_t] (r,),  base[t] = E[x_t] (or base_out[t])
    backward:  dB       = c * sum_t dy[t]^T a_t                                          (D, r)
               dA[:, v] = c * w_v * sum_{t: x_t = v} dy[t] B                             (r, V)
               w_v = 1 / count(v) with ``scale_grad_by_freq`` (else 1), and 0 at ``padding_idx``

with c = s * embed_scale (s = alpha / r; embed_scale 1 unless the embedding has one: Gemma's scaled
embeddings scale the adapter term too, as HF PEFT does). This is ``F.embedding``'s semantics on the
adapter's ``A^T``: the padding index is looked up in forward like any other (its tokens reach y and dB),
only its column of A gets no gradient. The frozen table gets no gradient. ``max_norm`` (a renorm of the
looked-up columns in place) and ``sparse`` gradients are not here: the module keeps its PyTorch path for them.

DoRA (HF PEFT's ``DoraEmbeddingLayer``; ``magnitude`` m and the detached ``weight_norm`` ``||E^T + s B A||_row``,
both (D,)): with f = m / norm (D,) fp32, a constant to autograd, and z[t] = base[t] + c * a_t B^T,

    forward:   y[t]     = f * z[t]                                   (f per column, in _fwd's epilogue)
    backward:  dz[t]    = dy[t] * f                                  (rounded to dy's dtype; never written)
               dA, dB   as above with dz in place of dy
               dm       = sum_t dy[t] * z[t] / norm                  (D,), z = y / f recovered from y

y itself is saved for dm (no copy of z is kept, the lookup is not redone); where f_j = 0 (m_j = 0) y holds
no z, and the tiles that hold such a column recompute z there from the ids, A, B and E (or the base output:
given again by the caller's ``recompute_base``, called in backward only when some f is 0, or saved).

Shapes: ids ``x`` any shape, int32 / int64 (T = x.numel() tokens); E ``(V, D)``; A ``(r, V)`` (HF PEFT's
``lora_embedding_A``); B ``(D, r)`` (``lora_embedding_B``); base_out, y, dy ``(*x.shape, D)``; m, norm, f ``(D,)``.

Kernels (Triton on CUDA, or on the CPU under ``TRITON_INTERPRET=1``):
  * ``_fwd``: one launch; one program per tile of BT tokens x BD columns gathers the tile's ids, E's rows
    (or base_out's), A's columns (r strided loads per token) and B's (BD, r) tile, forms the
    (BT, r) x (r, BD) product in registers and writes y once (DoRA: times f, loaded per column). Nothing of
    shape (T, r) is written or saved: backward gathers a_t from A again (A and B are saved, as parameters cost
    nothing to keep; so are the ids).
  * backward, after one stable sort of the ids (``torch.sort(stable=True)``) and a ``searchsorted`` for
    the end of each run of equal ids (no host sync):
      ``_dyb``: g = c * dy B ``(T, r)`` fp32, one read of dy (DoRA: dz = dy * f formed as dy is loaded);
      ``_db``: dB, one program per (BD columns, rank block, split of the tokens) walking its tokens in
        order; fp32 partials ``(splits, D, r)`` added by ``torch.sum`` over the split axis (a second read of dy).
        DoRA: dz = dy * f as dy is loaded, and the programs of the first rank block also read y's tile and sum
        dy * z over their tokens: fp32 partials ``(splits, D)`` of dm's numerator, summed over the split axis
        and divided by the norm (one read of y; only dm asked for: the same launch without the dB product);
      ``_seg``: one program per sorted position; the first position of each run sums g over the run in
        sorted order, scales it by w_v and writes A's column v; the other positions exit. dA starts at zero.
  Deterministic: no atomics, and every sum runs in an order the ids alone fix (the sort is stable; the
  splits of dB and dm are fixed by the shapes and the device). Two backward passes give the same bits.

Precision: every operand is widened to fp32 in registers; the products run as ``tf32`` dots when all
their operands are fp16 / bf16 (such values are exact in tf32, so the products are exact) and as
``ieee`` fp32 dots otherwise; y, dA and dB are rounded once to their dtypes (y: the base's; dA, dB: A's
and B's). The PyTorch path rounds ``A^T[x] B^T``, its product by s and the sum each to the base's dtype,
so the two differ by about one unit of that format's rounding. DoRA adds one rounding per term: dz is rounded
to dy's dtype (as the linear DoRA path's dz; exact in tf32 then), and dm reads z = y / f from y rounded to its
dtype, so dm carries y's relative rounding (bf16: 2^-9 per term; where f_j is so small that f_j z underflows
in y's format, z is lost there, as on the linear path). The PyTorch path also rounds f to the base's dtype.

Ids outside ``[0, V)`` raise an ``IndexError`` on the CPU (as ``F.embedding``); on CUDA they are not
checked (that would cost a sync): their rows read as zero. Block sizes below are starting points for
a bandwidth-bound gather, not yet tuned on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backend import HAS_TRITON, KERNEL_DTYPES, on_device_of, use_kernels_for

_FUNCTORCH_LEVEL = getattr(torch._C._functorch, "peek_interpreter_stack", None)

if HAS_TRITON:  # triton is optional: without it the PyTorch math runs everywhere
    import triton
    import triton.language as tl

    from .launch import INTERPRET, cdiv, launch_fixed, rank_block, sm_count

    # (BT tokens, BD columns) per program. GPU: a (32, 128) tile is 8 KB of bf16 rows per operand (not tuned
    # yet); the interpreter's small tiles make the test shapes span several programs and rank blocks.
    _FWD = dict(BT=16, BD=16) if INTERPRET else dict(BT=32, BD=128)
    _DYB = dict(BT=16, BD=16) if INTERPRET else dict(BT=16, BD=128)  # BT 16: T / 16 programs (256 at 4096 tokens)
    _DB = dict(BT=16, BD=16) if INTERPRET else dict(BT=64, BD=64)
    _SEG_BM = 4 if INTERPRET else 32  # rows of g summed per step of a run

    @triton.jit
    def _z_tile(ids, ok_v, rt, ok_t, rd, ok_d, base_ptr, a_ptr, b_ptr, es_ptr, R, scale,
                s_base, s_bc, s_ar, s_av, s_bd, s_br,
                GATHER: tl.constexpr, ES: tl.constexpr, PREC: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
        """z = base + c * a B^T on one (BT, BD) tile, fp32: ids, ok_v, rt, ok_t (BT,) (ids int64); rd, ok_d (BD,).
        base: E ``(V, D)`` gathered by id (GATHER) or a base output ``(T, D)`` read by token."""
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            a = tl.load(a_ptr + rr[None, :] * s_ar + ids[:, None] * s_av,
                        mask=ok_v[:, None] & (rr[None, :] < R), other=0.0).to(tl.float32)  # (BT, BR): A[:, x_t]^T
            bt = tl.load(b_ptr + rd[None, :].to(tl.int64) * s_bd + rr[:, None] * s_br,
                         mask=(rr[:, None] < R) & ok_d[None, :], other=0.0).to(tl.float32)  # (BR, BD): B^T tile
            acc += tl.dot(a, bt, input_precision=PREC)
        c = scale
        if ES:
            c = c * tl.load(es_ptr)
        if GATHER:  # the frozen table's rows
            base = tl.load(base_ptr + ids[:, None] * s_base + rd[None, :] * s_bc, mask=ok_v[:, None] & ok_d[None, :],
                           other=0.0)
        else:  # a base output computed by the caller, (T, D)
            base = tl.load(base_ptr + rt[:, None].to(tl.int64) * s_base + rd[None, :] * s_bc,
                           mask=ok_t[:, None] & ok_d[None, :], other=0.0)
        return base.to(tl.float32) + c * acc

    @triton.jit
    def _fwd_kernel(ids_ptr, base_ptr, a_ptr, b_ptr, es_ptr, f_ptr, y_ptr, T, V, D, R, scale,
                    s_base, s_bc, s_ar, s_av, s_bd, s_br,
                    GATHER: tl.constexpr, ES: tl.constexpr, DORA: tl.constexpr, PREC: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
        rt = tl.program_id(0) * BT + tl.arange(0, BT)
        rd = tl.program_id(1) * BD + tl.arange(0, BD)
        ok_t, ok_d = rt < T, rd < D
        ids = tl.load(ids_ptr + rt, mask=ok_t, other=0).to(tl.int64)  # int64: ids * s_base may pass 2**31
        ok_v = ok_t & (ids >= 0) & (ids < V)
        y = _z_tile(ids, ok_v, rt, ok_t, rd, ok_d, base_ptr, a_ptr, b_ptr, es_ptr, R, scale,
                    s_base, s_bc, s_ar, s_av, s_bd, s_br, GATHER, ES, PREC, BT, BD, BR)  # (BT, BD)
        if DORA:  # DoRA's column scale f (D,) in the epilogue
            y = y * tl.load(f_ptr + rd, mask=ok_d, other=0.0)[None, :]
        tl.store(y_ptr + rt[:, None].to(tl.int64) * D + rd[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=ok_t[:, None] & ok_d[None, :])

    @triton.jit
    def _dyb_kernel(dy_ptr, b_ptr, es_ptr, f_ptr, g_ptr, T, D, R, scale, s_bd, s_br,
                    ES: tl.constexpr, DORA: tl.constexpr, PREC: tl.constexpr,
                    BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
        rt = tl.program_id(0) * BT + tl.arange(0, BT)
        rr = tl.program_id(1) * BR + tl.arange(0, BR)
        ok_t, ok_r = rt < T, rr < R
        acc = tl.zeros((BT, BR), dtype=tl.float32)
        for d0 in range(0, D, BD):
            rd = d0 + tl.arange(0, BD)
            dy = tl.load(dy_ptr + rt[:, None].to(tl.int64) * D + rd[None, :],
                         mask=ok_t[:, None] & (rd[None, :] < D), other=0.0).to(tl.float32)  # (BT, BD)
            if DORA:  # dz = dy * f, rounded to dy's dtype
                f = tl.load(f_ptr + rd, mask=rd < D, other=0.0)  # (BD,)
                dy = (dy * f[None, :]).to(dy_ptr.dtype.element_ty).to(tl.float32)
            b = tl.load(b_ptr + rd[:, None].to(tl.int64) * s_bd + rr[None, :] * s_br,
                        mask=(rd[:, None] < D) & ok_r[None, :], other=0.0).to(tl.float32)  # (BD, BR)
            acc += tl.dot(dy, b, input_precision=PREC)
        c = scale
        if ES:
            c = c * tl.load(es_ptr)
        tl.store(g_ptr + rt[:, None].to(tl.int64) * R + rr[None, :], acc * c, mask=ok_t[:, None] & ok_r[None, :])

    @triton.jit
    def _dm_tile(dyt, y_ptr, f_safe, zero_f, any_zero, ids, ok_v, rt, ok_t, rd, ok_d, D,
                 base_ptr, a_ptr, b_ptr, es_ptr, R, scale, s_base, s_bc, s_ar, s_av, s_bd, s_br,
                 GATHER: tl.constexpr, ES: tl.constexpr, PREC: tl.constexpr,
                 BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
        """sum_t dy[t, j] z[t, j] over one (BD, BT) tile, (BD,) fp32: z = y / f from y, recomputed (``_z_tile``)
        in the columns whose f is 0 (y holds no z there) when the tile has one (``any_zero``)."""
        yt = tl.load(y_ptr + rt[None, :].to(tl.int64) * D + rd[:, None],
                     mask=ok_d[:, None] & ok_t[None, :], other=0.0).to(tl.float32)  # (BD, BT): y^T tile
        z = yt / f_safe[:, None]
        if any_zero:
            zr = _z_tile(ids, ok_v, rt, ok_t, rd, ok_d, base_ptr, a_ptr, b_ptr, es_ptr, R, scale,
                         s_base, s_bc, s_ar, s_av, s_bd, s_br, GATHER, ES, PREC, BT, BD, BR)  # (BT, BD)
            z = tl.where(zero_f[:, None], tl.trans(zr), z)
        return tl.sum(dyt * z, axis=1)

    @triton.jit
    def _db_kernel(dy_ptr, ids_ptr, a_ptr, b_ptr, base_ptr, es_ptr, f_ptr, y_ptr, out_ptr, part_ptr,
                   T, V, D, R, scale, chunk, s_ar, s_av, s_bd, s_br, s_base, s_bc, s_os, s_od, s_or,
                   DB: tl.constexpr, DORA: tl.constexpr, DM: tl.constexpr, GATHER: tl.constexpr, ES: tl.constexpr,
                   PREC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
        rd = tl.program_id(0) * BD + tl.arange(0, BD)
        rr = tl.program_id(1) * BR + tl.arange(0, BR)
        split = tl.program_id(2)
        ok_d, ok_r = rd < D, rr < R
        start = split * chunk
        end = tl.minimum(start + chunk, T)
        f = tl.full((BD,), 1.0, tl.float32)
        if DORA:
            f = tl.load(f_ptr + rd, mask=ok_d, other=1.0).to(tl.float32)  # (BD,)
        zero_f = (f == 0.0) & ok_d
        f_safe = tl.where(zero_f, 1.0, f)
        any_zero = tl.max(zero_f.to(tl.int32), axis=0) > 0
        acc = tl.zeros((BD, BR), dtype=tl.float32)
        dm = tl.zeros((BD,), dtype=tl.float32)
        for t0 in range(start, end, BT):
            rt = t0 + tl.arange(0, BT)
            ok_t = rt < end
            dyt = tl.load(dy_ptr + rt[None, :].to(tl.int64) * D + rd[:, None],
                          mask=ok_d[:, None] & ok_t[None, :], other=0.0).to(tl.float32)  # (BD, BT): dy^T tile
            ids = tl.load(ids_ptr + rt, mask=ok_t, other=0).to(tl.int64)
            ok_v = ok_t & (ids >= 0) & (ids < V)
            if DB:
                dzt = dyt
                if DORA:  # dz = dy * f, rounded to dy's dtype
                    dzt = (dyt * f[:, None]).to(dy_ptr.dtype.element_ty).to(tl.float32)
                a = tl.load(a_ptr + rr[None, :] * s_ar + ids[:, None] * s_av,
                            mask=ok_v[:, None] & ok_r[None, :], other=0.0).to(tl.float32)  # (BT, BR)
                acc += tl.dot(dzt, a, input_precision=PREC)
            if DM:
                if tl.program_id(1) == 0:  # the first rank block also sums dy * z (dm's numerator)
                    dm += _dm_tile(dyt, y_ptr, f_safe, zero_f, any_zero, ids, ok_v, rt, ok_t, rd, ok_d, D,
                                   base_ptr, a_ptr, b_ptr, es_ptr, R, scale, s_base, s_bc, s_ar, s_av, s_bd, s_br,
                                   GATHER, ES, PREC, BT, BD, BR)
        if DB:
            c = scale
            if ES:
                c = c * tl.load(es_ptr)
            tl.store(out_ptr + split * s_os + rd[:, None] * s_od + rr[None, :] * s_or,
                     (acc * c).to(out_ptr.dtype.element_ty), mask=ok_d[:, None] & ok_r[None, :])
        if DM:
            if tl.program_id(1) == 0:
                tl.store(part_ptr + split.to(tl.int64) * D + rd, dm, mask=ok_d)

    @triton.jit
    def _seg_kernel(sorted_ptr, order_ptr, ends_ptr, g_ptr, da_ptr, V, R, pad, s_dar, s_dav,
                    PAD: tl.constexpr, FREQ: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        rr = tl.program_id(1) * BR + tl.arange(0, BR)
        ok_r = rr < R
        v = tl.load(sorted_ptr + i)
        prev = tl.load(sorted_ptr + i - 1, mask=i > 0, other=-1)
        first = (i == 0) | (prev != v)
        if PAD:
            first = first & (v != pad)  # the padding column keeps its zero gradient
        if first & (v >= 0) & (v < V):
            end = tl.load(ends_ptr + i)
            acc = tl.zeros((BR,), dtype=tl.float32)
            for m0 in range(i, end, BM):
                rm = m0 + tl.arange(0, BM)
                ok_m = rm < end
                tok = tl.load(order_ptr + rm, mask=ok_m, other=0).to(tl.int64)
                g = tl.load(g_ptr + tok[:, None] * R + rr[None, :], mask=ok_m[:, None] & ok_r[None, :], other=0.0)
                acc += tl.sum(g, axis=0)
            if FREQ:  # F.embedding's scale_grad_by_freq: the column's gradient over its count in the batch
                acc = acc / (end - i).to(tl.float32)
            tl.store(da_ptr + rr * s_dar + v.to(tl.int64) * s_dav, acc.to(da_ptr.dtype.element_ty), mask=ok_r)


def _prec(*dtypes: torch.dtype) -> str:
    """``"ieee"`` when an operand is fp32, else ``"tf32"`` (fp16 / bf16 values are exact in tf32)."""
    return "ieee" if torch.float32 in dtypes else "tf32"


def _check_ids(ids: torch.Tensor, V: int) -> None:
    """On the CPU, ids outside ``[0, V)`` raise as ``F.embedding`` does (free there; on CUDA a check would sync)."""
    if ids.device.type == "cpu" and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise IndexError(f"embedding ids must lie in [0, {V}), got ids in [{int(ids.min())}, {int(ids.max())}]")


def embedding_lora_forward(ids: torch.Tensor, base: torch.Tensor, gather: bool, lora_A: torch.Tensor,
                           lora_B: torch.Tensor, scale: float, es: torch.Tensor | None,
                           f: torch.Tensor | None = None, shape: tuple = (), fast: bool = True) -> torch.Tensor:
    """y ``(*shape, D)`` (default ``(T, D)``) in base's dtype for flat contiguous ``ids`` (T,): ``base`` is the
    table E ``(V, D)`` (``gather``) or a base output ``(T, D)``; ``es`` a one-element fp32 tensor or None; ``f``
    DoRA's column scale ``(D,)`` fp32 contiguous (y = f * z) or None. Allocated in its final shape, so the
    caller's output is no view (callers may write it in place, as they may a lookup's)."""
    T, (R, V), D = ids.numel(), lora_A.shape, lora_B.shape[0]
    _check_ids(ids, V)
    out = torch.empty(*(shape or (T,)), D, device=base.device, dtype=base.dtype)
    y = out.view(T, D)  # the kernel's (T, D) rows of the same storage
    if T == 0 or D == 0:
        return out
    ptrs = (ids, base, lora_A, lora_B, base if es is None else es, y if f is None else f, y)
    scalars = (T, V, D, R, float(scale), *base.stride(), *lora_A.stride(), *lora_B.stride())
    consts = dict(GATHER=gather, ES=es is not None, DORA=f is not None, PREC=_prec(lora_A.dtype, lora_B.dtype))
    launch_fixed(_fwd_kernel, (cdiv(T, _FWD["BT"]), cdiv(D, _FWD["BD"])), {**_FWD, "BR": rank_block(R)}, ptrs,
                 scalars, consts, fast)
    return out


class DoraSaved(NamedTuple):
    """What DoRA's backward reads: f ``(D,)`` fp32, the layer's output y ``(T, D)``, and what the base z of the
    columns whose f is 0 is recomputed from: E ``(V, D)`` (``gather``: always), else the base output ``(T, D)``
    (the caller's, or ``recompute_base``'s where some f is 0; None where no f is 0)."""

    f: torch.Tensor
    y: torch.Tensor
    base: torch.Tensor | None
    gather: bool


def _db_splits(T: int, n_tiles: int, device) -> int:
    """Token splits of the dB kernel: about two programs per SM in all, each split at least BT tokens."""
    return max(1, min(cdiv(2 * sm_count(device), n_tiles), cdiv(T, _DB["BT"])))


def _db_dm(dy, ids, lora_A, lora_B, scale, es, dora: DoraSaved | None, need_dB: bool, need_dm: bool, fast: bool):
    """``(dB (D, r) in B's dtype, sum_t dy * z (D,) fp32)`` (None where not needed) from one ``_db`` launch:
    dy ``(T, D)`` contiguous, ids ``(T,)``; dm's numerator only with ``dora``."""
    T, (R, V), D = ids.numel(), lora_A.shape, lora_B.shape[0]
    BR = rank_block(R)
    BT, BD = _DB["BT"], _DB["BD"]
    rank_tiles = cdiv(R, BR) if need_dB else 1
    splits = _db_splits(T, cdiv(D, BD) * rank_tiles, dy.device)
    chunk = max(1, cdiv(cdiv(T, splits), BT)) * BT
    splits = max(1, cdiv(T, chunk))
    if not need_dB:  # dm's numerator alone: the kernel writes no dB
        out = dy.new_empty(1, 1, 1)  # a placeholder pointer
    elif splits == 1:
        out = torch.empty(D, R, device=dy.device, dtype=lora_B.dtype)[None]
    else:
        out = torch.empty(splits, D, R, device=dy.device, dtype=torch.float32)
    runs = bool(T and D and (R or not need_dB))
    # dm's partials: the kernel writes every one; zeros only where it does not run
    part = (torch.empty if runs else torch.zeros)(splits if need_dm else 0, D, device=dy.device, dtype=torch.float32)
    if runs:
        base = dy if dora is None or dora.base is None else dora.base
        prec = _prec(dy.dtype, lora_A.dtype) if dora is None else _prec(dy.dtype, lora_A.dtype, lora_B.dtype)
        ptrs = (dy, ids, lora_A, lora_B, base, dy if es is None else es, dy if dora is None else dora.f,
                dy if dora is None else dora.y, out, part)
        scalars = (T, V, D, R, float(scale), chunk, *lora_A.stride(), *lora_B.stride(), *base.stride(), *out.stride())
        consts = dict(DB=need_dB, DORA=dora is not None, DM=need_dm, GATHER=dora is not None and dora.gather,
                      ES=es is not None, PREC=prec)
        launch_fixed(_db_kernel, (cdiv(D, BD), rank_tiles, splits), {**_DB, "BR": BR}, ptrs, scalars, consts, fast)
    elif need_dB:
        out.zero_()
    dB = None
    if need_dB:
        dB = out[0] if splits == 1 else out.sum(0).to(lora_B.dtype)  # a fixed-order sum over a fixed split
    return dB, (part.sum(0) if need_dm else None)


def embedding_lora_backward(dy: torch.Tensor, ids: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                            scale: float, es: torch.Tensor | None, padding_idx: int | None, scale_grad_by_freq: bool,
                            need_dA: bool, need_dB: bool, dora: DoraSaved | None = None, need_dm: bool = False,
                            fast: bool = True):
    """``(dA, dB, sum_t dy * z)`` (None where not needed) for contiguous dy ``(T, D)`` and flat ids ``(T,)``;
    with ``dora`` the LoRA gradients are taken of dz = dy * f, and dm's numerator ``(D,)`` fp32 is summed."""
    T, (R, V), D = ids.numel(), lora_A.shape, lora_B.shape[0]
    BR = rank_block(R)
    dA = dB = dm_sum = None
    if need_dB or need_dm:
        dB, dm_sum = _db_dm(dy, ids, lora_A, lora_B, scale, es, dora, need_dB, need_dm and dora is not None, fast)
    if need_dA:
        dA = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
        if T and D and R:
            g = torch.empty(T, R, device=dy.device, dtype=torch.float32)  # c * dz B, (T, r)
            launch_fixed(_dyb_kernel, (cdiv(T, _DYB["BT"]), cdiv(R, BR)), {**_DYB, "BR": BR},
                         (dy, lora_B, dy if es is None else es, dy if dora is None else dora.f, g),
                         (T, D, R, float(scale), *lora_B.stride()),
                         dict(ES=es is not None, DORA=dora is not None, PREC=_prec(dy.dtype, lora_B.dtype)), fast)
            # 32-bit keys where the vocabulary fits (half the radix passes of int64); stable: ties keep token order
            sorted_ids, order = torch.sort(ids.int() if V < 2**31 else ids.long(), stable=True)
            ends = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # end of each position's run
            launch_fixed(_seg_kernel, (T, cdiv(R, BR)), dict(BM=_SEG_BM, BR=BR), (sorted_ids, order, ends, g, dA),
                         (V, R, -1 if padding_idx is None else int(padding_idx), *dA.stride()),
                         dict(PAD=padding_idx is not None, FREQ=bool(scale_grad_by_freq)), fast)
    return dA, dB, dm_sum


class _EmbeddingLoRAFunction(torch.autograd.Function):
    """ids ``(...)`` int, base ``(V, D)`` (gather) or ``(..., D)``, lora_A ``(r, V)``, lora_B ``(D, r)`` (DoRA:
    magnitude, weight_norm ``(D,)``) -> y ``(..., D)``. Saves the ids, A, B (and embed_scale's tensor), nothing
    of shape (T, r) or (T, D). DoRA also saves f, the norm and its own output y (so y must not be written in
    place before backward), and a base output the caller gave without ``recompute_base``; the frozen table E is
    held on ``ctx`` (a parameter the module keeps anyway), not saved, so saved-tensor hooks (``save_on_cpu``,
    offloading) never copy the whole table."""

    @staticmethod
    def forward(ctx, ids, base, gather: bool, lora_A, lora_B, scale: float, es, padding_idx, scale_grad_by_freq,
                magnitude=None, weight_norm=None, recompute_base=None, fast=True):
        flat = ids.reshape(-1).contiguous()
        D = lora_B.shape[0]
        base2 = base if gather else base.reshape(-1, D)  # any strides: the kernel reads both
        f = None
        if magnitude is not None:  # detached: the norm is a constant, dm comes from backward
            f = (magnitude.detach().to(torch.float32) / weight_norm.to(torch.float32)).contiguous()
        out = on_device_of(flat, embedding_lora_forward, flat, base2, gather, lora_A, lora_B, scale, es, f,
                           tuple(ids.shape), fast)
        saved = (None,) * 4
        if f is not None:  # a caller's base output only where it cannot be recomputed
            saved = (out, f, weight_norm, None if gather or recompute_base is not None else base)
        ctx.save_for_backward(flat, lora_A, lora_B, es, *saved)
        ctx.table = base if f is not None and gather else None
        ctx.scale, ctx.padding_idx, ctx.freq, ctx.gather = scale, padding_idx, scale_grad_by_freq, gather
        ctx.recompute_base, ctx.fast = recompute_base, fast
        ctx.magnitude_dtype = None if magnitude is None else magnitude.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        flat, lora_A, lora_B, es, y, f, norm, base = ctx.saved_tensors
        base = ctx.table if ctx.gather else base
        nig = ctx.needs_input_grad
        need_dA, need_dB, need_dm = nig[3], nig[4], f is not None and nig[9]
        D = lora_B.shape[0]
        dy2 = dy.reshape(-1, D).contiguous()
        dora = None
        if f is not None:
            if base is None and need_dm and bool((f == 0).any()):  # one sync; y holds no z in those columns
                with torch.no_grad():
                    base = ctx.recompute_base()
            if base is not None and not ctx.gather:
                base = base.reshape(-1, D)
            dora = DoraSaved(f, y.reshape(-1, D), base, ctx.gather)
        dA, dB, dm = on_device_of(flat, embedding_lora_backward, dy2, flat, lora_A, lora_B, ctx.scale, es,
                                  ctx.padding_idx, ctx.freq, need_dA, need_dB, dora, need_dm, ctx.fast)
        if dm is not None:  # dm = sum_t dy * z / norm, the norm detached
            dm = (dm / norm.to(torch.float32)).to(ctx.magnitude_dtype)
        return None, None, None, dA, dB, None, None, None, None, dm, None, None, None


def reference_embedding_lora(ids, weight, lora_A, lora_B, scale, padding_idx=None, scale_grad_by_freq=False,
                             embed_scale=None, base_out=None, magnitude=None, weight_norm=None) -> torch.Tensor:
    """The PyTorch math (``EmbeddingLoRA``'s path without ``max_norm``): the lookup of ``A^T`` by ``F.embedding``
    with the base's padding and frequency options, in the base output's dtype; DoRA (``magnitude``): the sum
    times ``m / weight_norm`` rounded to that dtype (``automodel_lora.dora.dora_scale``)."""
    out = base_out if base_out is not None else F.embedding(ids, weight, padding_idx, None, 2.0, scale_grad_by_freq)
    dtype = out.dtype
    after_A = F.embedding(ids, lora_A.to(dtype).t(), padding_idx, None, 2.0, scale_grad_by_freq)  # (..., r)
    delta = (after_A @ lora_B.to(dtype).t()) * scale  # (..., D)
    if embed_scale is not None:
        delta = delta * (embed_scale.to(dtype) if torch.is_tensor(embed_scale) else embed_scale)
    if magnitude is not None:
        return (magnitude.to(weight_norm.dtype) / weight_norm.detach()).to(dtype) * (out + delta)
    return out + delta


def embedding_lora(ids: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                   *, padding_idx: int | None = None, scale_grad_by_freq: bool = False,
                   embed_scale: float | torch.Tensor | None = None, base_out: torch.Tensor | None = None,
                   use_triton: bool = True, magnitude: torch.Tensor | None = None,
                   weight_norm: torch.Tensor | None = None,
                   recompute_base: Callable[[], torch.Tensor] | None = None, fast_launch: bool = True) -> torch.Tensor:
    """``E[x] + c * A^T[x] B^T`` (c = scale * embed_scale) with a frozen table E, fused where the kernels run;
    with DoRA's ``magnitude``, ``f * (E[x] + c * A^T[x] B^T)``, f = magnitude / weight_norm per column.

    Args:
        ids: token ids, any shape, int32 or int64, in ``[0, V)``.
        weight: the table E ``(V, D)`` (fp32, fp16 or bf16 for the kernels); frozen on the kernel path (a table
            that requires grad takes the PyTorch path, which gives it its gradient).
        lora_A: ``(r, V)`` (HF PEFT's ``lora_embedding_A``). lora_B: ``(D, r)`` (``lora_embedding_B``).
        scale: s = alpha / r (or alpha / sqrt(r)).
        padding_idx: A's column at this index gets no gradient (its tokens are looked up and reach dB).
        scale_grad_by_freq: each column's gradient divided by its id's count in ``ids``.
        embed_scale: a float or one-element tensor multiplying the adapter term (the base output carries its own).
        base_out: the base lookup ``(*ids.shape, D)`` when the caller computes it (a subclass's forward);
            None: ``E[ids]`` is gathered in the kernel.
        use_triton: run the kernels where they run (CUDA, or the CPU under ``TRITON_INTERPRET=1``; fp32 / fp16 /
            bf16 tables and adapters); False: the PyTorch math everywhere.
        magnitude: DoRA's m ``(D,)`` (trainable, any float dtype), with ``weight_norm``, the detached ``(D,)``
            ``||E^T + s B A||_row`` (``automodel_lora.dora.row_norms``). The output is saved for backward (dm is
            recovered from it): do not modify it in place.
        recompute_base: with ``magnitude`` and ``base_out``: a callable returning ``base_out`` again, called in
            backward only when some f is 0 (y holds no z in those columns; one host sync to find out); None:
            ``base_out`` itself is saved for backward.
        fast_launch: as ``KernelOptions.fast_launch``.

    Returns:
        ``(*ids.shape, D)`` in the base's dtype; gradients flow to lora_A and lora_B (and magnitude) in their dtypes.

    Raises:
        ValueError: ids that are not integers, or shapes that do not chain.
    """
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"embedding ids must be int32 or int64, got {ids.dtype}")
    V, D = weight.shape
    R = lora_A.shape[0]
    if lora_A.shape != (R, V) or lora_B.shape != (D, R):
        raise ValueError(f"embedding_lora: weight {tuple(weight.shape)}, lora_A {tuple(lora_A.shape)}, lora_B "
                         f"{tuple(lora_B.shape)} do not chain; expected (V, D), (r, V), (D, r)")
    if base_out is not None and base_out.shape != (*ids.shape, D):
        raise ValueError(f"base_out must have shape {(*ids.shape, D)}, got {tuple(base_out.shape)}")
    if magnitude is not None or weight_norm is not None:
        if magnitude is None or weight_norm is None or magnitude.shape != (D,) or weight_norm.shape != (D,):
            raise ValueError(f"DoRA needs both magnitude and weight_norm of shape ({D},)")
    base = weight if base_out is None else base_out
    kernels = (use_triton and use_kernels_for(base) and lora_A.dtype in KERNEL_DTYPES
               and lora_B.dtype in KERNEL_DTYPES and not base.requires_grad
               and ids.device == base.device == lora_A.device == lora_B.device
               and (magnitude is None or magnitude.device == weight_norm.device == base.device)
               and not torch.compiler.is_compiling()
               and (_FUNCTORCH_LEVEL is None or _FUNCTORCH_LEVEL() is None))
    if not kernels:
        return reference_embedding_lora(ids, weight, lora_A, lora_B, scale, padding_idx, scale_grad_by_freq,
                                        embed_scale, base_out, magnitude, weight_norm)
    es = None
    if torch.is_tensor(embed_scale):  # rounded to the base's dtype first, as the PyTorch path multiplies it
        es = embed_scale.detach().to(base.dtype).to(device=base.device, dtype=torch.float32).reshape(1)
    elif embed_scale is not None:
        scale = scale * float(embed_scale)
    return _EmbeddingLoRAFunction.apply(ids, base, base_out is None, lora_A, lora_B, float(scale), es, padding_idx,
                                        scale_grad_by_freq, magnitude, weight_norm, recompute_base, bool(fast_launch))
