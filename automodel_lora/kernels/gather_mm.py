"""Gathered product (Punica's BGMV): every row times the matrix its own id picks, optionally added to another tensor.

    out[i] = add[i] + x[i] @ w[ids[i]]^T          x (M, K), w (G, N, K), ids (M,) in any order

The same math and conventions as ``segment_mm`` (``w`` stacked (G, N, K) and read through its strides; a row
with a negative id, or one of G or more, gets no product: ``add`` alone, or zero; the result is a new tensor in
``add``'s dtype, else ``x``'s; ``add`` is read, not written), for rows that do not come in runs of one id: the
decode step of a batch mixing adapters, one row per sequence, up to one adapter per row. ``segment_mm`` gives a
block of rows one pass per id present in it (64 passes for 64 rows of 64 adapters); here each program reads its
row's matrix directly.

One program per (row, BN columns, slice of K): it loads the row's id and, for a real one, walks its slice of K
in BK steps, multiplying the row's slice of ``x`` (BK,) by the (BN, BK) tile of ``w[id]`` elementwise and summing
over K in fp32 (a matrix-vector product: no ``tl.dot``, which needs 16 rows). A row without an id skips the loop.
K is sliced only where (row, column block) programs are fewer than two per SM (``k_splits``: the decode shrink,
N = r, K = hidden); each slice then writes an fp32 partial, and the last slice of its (row, block) to finish
(counted on a self-resetting lock, ``launch.tile_locks``) adds the partials in slice order: deterministic for a
given batch size and GPU (the slicing, so the rounding, depends on both).

Memory floor: each distinct id's matrix read once (G_used * N * K elements), ``x`` read once per column block,
``add`` read and ``out`` written once (M * N each). Rows sharing an id re-read its matrix, from L2 when the
programs of those rows run close together. For the decode shrink (N = r small, K = hidden) that is each
adapter's ``A``; for the expand (K = r, N = out) each adapter's ``B`` plus the output.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, KERNEL_DTYPES, on_device_of, use_kernels_for

__all__ = ["gather_mm", "gathered_product"]

if HAS_TRITON:  # without triton gather_mm takes its PyTorch path
    import triton
    import triton.language as tl

    from .launch import INTERPRET, cdiv, launch_fixed, next_pow2, sm_count, tile_locks

    @triton.jit
    def _gather_mm_kernel(x_ptr, w_ptr, ids_ptr, add_ptr, out_ptr, part_ptr, lock_ptr, N, K, G, KC, S,
                          sxm, sxk, swg, swn, swk, sam, san, som, son,
                          HAS_ADD: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        m = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1)
        s = tl.program_id(2)
        rn = pid_n * BN + tl.arange(0, BN)
        col_ok = rn < N
        g = tl.load(ids_ptr + m).to(tl.int64)
        valid = (g >= 0) & (g < G)
        k_start = s * KC
        k_end = tl.where(valid, tl.minimum(k_start + KC, K), k_start)  # a row without an id: no loop, no product
        w_row = w_ptr + tl.where(valid, g, 0) * swg
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in range(k_start, k_end, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < k_end
            xt = tl.load(x_ptr + m * sxm + rk * sxk, mask=k_ok, other=0.0).to(tl.float32)  # (BK,)
            wt = tl.load(w_row + rn[:, None] * swn + rk[None, :] * swk,
                         mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (BN, BK)
            acc += tl.sum(wt * xt[None, :], axis=1)
        if S > 1:  # split K: each slice writes its partial, the last of the (row, column block) sums them in order
            offs = m * N + rn  # (BN,) in one slice's (M, N) partial
            slice_stride = tl.num_programs(0).to(tl.int64) * N
            tl.store(part_ptr + s * slice_stride + offs, acc, mask=col_ok)
            tl.debug_barrier()  # every thread's partial is written before the release below
            lock = lock_ptr + m * tl.num_programs(1) + pid_n
            done = tl.atomic_add(lock, 1, sem="acq_rel", scope="gpu")
            if done == S - 1:
                tl.debug_barrier()
                acc = tl.zeros((BN,), dtype=tl.float32)
                part_ptrs = part_ptr + offs
                for _ in range(0, S):
                    acc += tl.load(part_ptrs, mask=col_ok, other=0.0, cache_modifier=".cg")
                    part_ptrs += slice_stride
                if HAS_ADD:
                    acc += tl.load(add_ptr + m * sam + rn * san, mask=col_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + m * som + rn * son, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
                tl.atomic_xchg(lock, 0, sem="relaxed", scope="gpu")  # ready for the next launch
        else:
            if HAS_ADD:
                acc += tl.load(add_ptr + m * sam + rn * san, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + m * som + rn * son, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _tiles(N: int, K: int) -> tuple[int, int]:
    """(BN, BK): the (BN, BK) weight tile of one step holds at most 8192 elements (64 fp32 registers a thread
    at 4 warps); a skinny N (the shrink) takes long K steps, a skinny K (the expand) wide column blocks."""
    if INTERPRET:
        return 16, 16
    bn = min(max(next_pow2(N), 16), 256)
    bk = min(max(next_pow2(K), 16), 8192 // bn)
    return bn, bk


def k_splits(M: int, col_blocks: int, K: int, BK: int, n_sm: int) -> tuple[int, int]:
    """(slices of K, columns of K per slice, a multiple of BK): about two programs per SM where the (row, column
    block) programs alone are fewer (the shrink of a decode step: 64 rows x 1 block of r columns, each walking a
    whole hidden dimension of ``A``), else one slice."""
    steps = max(cdiv(K, BK), 1)  # K = 0: one slice with nothing to sum (add alone, or zero)
    want = min(cdiv(2 * n_sm, max(M * col_blocks, 1)), steps)
    kc = cdiv(steps, want) * BK
    return max(cdiv(K, kc), 1), kc


def _check(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, add: torch.Tensor | None) -> None:
    """ValueError naming the argument that does not fit and what would."""
    shapes = (f"x {tuple(x.shape)}, w {tuple(w.shape)}, ids {tuple(ids.shape)}"
              f"{'' if add is None else f', add {tuple(add.shape)}'}")
    if x.dim() != 2 or w.dim() != 3 or ids.dim() != 1:
        raise ValueError(f"gather_mm: {shapes}; expected x (M, K), w (G, N, K), ids (M,)")
    M, K = x.shape
    G, N, K2 = w.shape
    if K2 != K or ids.shape[0] != M or (add is not None and tuple(add.shape) != (M, N)):
        raise ValueError(f"gather_mm: {shapes} do not chain; expected x (M, K), w (G, N, K) with the same K, "
                         "ids (M,), add (M, N)")
    if not x.is_floating_point() or not w.is_floating_point() or (add is not None and not add.is_floating_point()):
        raise ValueError(f"gather_mm: x {x.dtype}, w {w.dtype}{'' if add is None else f', add {add.dtype}'}; "
                         "x, w and add must be floating point (cast them, e.g. .to(torch.bfloat16))")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"gather_mm: ids has dtype {ids.dtype}; pass integer ids (e.g. ids.long()), -1 for none")
    others = [("w", w), ("ids", ids)] + ([] if add is None else [("add", add)])
    for name, t in others:
        if t.device != x.device:
            raise ValueError(f"gather_mm: {name} is on {t.device} and x on {x.device}; move them to one device "
                             f"(e.g. {name}.to(x.device))")


def gathered_product(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor,
                     add: torch.Tensor | None = None) -> torch.Tensor:
    """``gather_mm``'s math in PyTorch, differentiable: one product per distinct id present (a host sync reads
    them), in at least fp32; the result in ``add``'s dtype, else ``x``'s. The path where the kernel does not run
    (the CPU without the interpreter, other dtypes), and the one gradients take."""
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    M, N = x.shape[0], w.shape[1]
    acc = add.to(acc_dtype, copy=True) if add is not None else torch.zeros(M, N, dtype=acc_dtype, device=x.device)
    valid = (ids >= 0) & (ids < w.shape[0])
    for g in ids[valid].unique().tolist():
        sel = (ids == g).nonzero().squeeze(1)  # (rows of id g,)
        acc = acc.index_add(0, sel, x[sel].to(acc_dtype) @ w[g].T.to(acc_dtype))
    return acc.to(add.dtype if add is not None else x.dtype)


def gather_mm(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, add: torch.Tensor | None = None,
              fast_launch: bool = True) -> torch.Tensor:
    """``out (M, N) = add + x[i] @ w[ids[i]]^T`` per row (see the module docstring); fp32 accumulation.

    Args:
        x: (M, K) rows, any order. w: (G, N, K), any strides. ids: (M,) int in [0, G); a negative id (or one of G
            or more) gives the row no product.
        add: (M, N) added to the product (the base output), or None; read, not written.
        fast_launch: as ``KernelOptions.fast_launch`` (a repeat call launches the compiled kernel directly: decode
            steps are short enough for the launch's host time to show).

    Returns:
        A new (M, N) tensor in ``add``'s dtype when given, else ``x``'s (as ``segment_mm``).

    Raises:
        ValueError: shapes that do not chain, non-floating ``x`` / ``w`` / ``add``, non-integer ``ids``, or
            tensors on different devices.
    """
    _check(x, w, ids, add)
    M, K = x.shape
    N = w.shape[1]
    if not use_kernels_for(x) or w.dtype not in KERNEL_DTYPES or (add is not None and add.dtype not in KERNEL_DTYPES):
        return gathered_product(x, w, ids, add)
    out = torch.empty(M, N, device=x.device, dtype=add.dtype if add is not None else x.dtype)
    if M == 0 or N == 0:
        return out
    BN, BK = _tiles(N, K)
    nb = cdiv(N, BN)
    S, KC = k_splits(M, nb, K, BK, sm_count(x.device))
    a = add if add is not None else out  # a placeholder pointer when HAS_ADD is off
    # (S, M, N) partials and the locks, where K is sliced; placeholder pointers otherwise
    part, locks = (torch.empty((S, M, N), device=x.device, dtype=torch.float32), tile_locks(x.device, M * nb)) \
        if S > 1 else (out, ids)
    ptrs = (x, w, ids, a, out, part, locks)
    scalars = (N, K, w.shape[0], KC, S, *x.stride(), *w.stride(), *a.stride(), *out.stride())
    on_device_of(x, launch_fixed, _gather_mm_kernel, (M, nb, S), dict(BN=BN, BK=BK), ptrs, scalars,
                 dict(HAS_ADD=add is not None), fast_launch)
    return out
