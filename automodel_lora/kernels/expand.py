"""The low-rank expand: ``C = f * (add + drop(s * P @ Q)) + bias``, the rank-r term spread back to full width.

    y  = base_out + drop_post(s * xa @ B^T)     P = xa (M, r),  Q = B^T (r, N)   lora_add
    y  = b + drop_post(s * xa @ B^T)            then y += x W^T by cuBLAS (beta=1)  the cuBLAS base GEMM
    dx = drop_pre(s * dyB @ A)                  then dx += dy W by cuBLAS          (M, K)
    y  = f * (x W^T + drop_post(s * xa @ B^T)) + b   add = x W^T (cuBLAS), written in place   DoRA

``f`` ``(N,)`` is an optional per-column scale (DoRA's ``m / ||W + s B A||_row``, fp32); without it f = 1.
One pass writing C; fp32 accumulation; arbitrary 2-D strides; int64 row offsets.  Q may be the fp32
master adapter (cast to P's dtype after loading).  Where the Triton base GEMM runs, the same term is
instead one more K step of that GEMM (``gemm.py`` / ``tma_gemm.py``) and this kernel does not run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dropout import philox_keep
from .launch import bench, cdiv, configs, dot_prec, launch, m_bucket, rank_block, run_cached, seed_tensor


@triton.jit
def _expand_kernel(
    p_ptr, q_ptr, bias_ptr, cin_ptr, c_ptr, seed_ptr, f_ptr,
    M, N, R,
    spm, spr, sqr, sqn, scim, scin, scm, scn,
    scale, p, inv_keep,
    HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr, HAS_SCALE: tl.constexpr, DROP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    rm64 = rm.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for r0 in range(0, R, BR):
        r_ok = (r0 + rr) < R
        pt = tl.load(p_ptr + rm64[:, None] * spm + (r0 + rr)[None, :] * spr,
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        qt = tl.load(q_ptr + (r0 + rr)[:, None] * sqr + rn[None, :] * sqn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(pt, qt.to(pt.dtype), acc, input_precision=DOT_PREC)  # fp32 adapter -> compute dtype
    acc = acc * scale
    if DROP:
        keep = philox_keep(seed_ptr, rm64, rn, N, p)
        acc = tl.where(keep, acc * inv_keep, 0.0)
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_ADD:
        acc += tl.load(cin_ptr + rm64[:, None] * scim + rn[None, :] * scin, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:  # the column scale applies to add + term, before the bias
        acc *= tl.load(f_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm64[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty), mask=mask)


_EXPAND_CONFIGS = [
    (dict(BM=128, BN=128), 4, 2),
    (dict(BM=128, BN=128), 8, 2),
    (dict(BM=64, BN=256), 8, 2),
    (dict(BM=128, BN=256), 8, 2),
    (dict(BM=64, BN=128), 4, 2),
]
_KEY = ["M", "N", "R", "DROP", "HAS_ADD", "HAS_SCALE"]
_expand_tuned = triton.autotune(configs=configs(_EXPAND_CONFIGS), key=_KEY, do_bench=bench)(_expand_kernel)
# In place (``out`` is ``add``): the autotuner times each config on the real arguments, so the output is
# restored after every timed run; without it the first call per key would add the term many times over.
_expand_tuned_in_place = triton.autotune(configs=configs(_EXPAND_CONFIGS), key=_KEY, do_bench=bench,
                                         restore_value=["c_ptr"])(_expand_kernel)


def expand(pm: torch.Tensor, q: torch.Tensor, scale: float, *, bias=None, add=None, col_scale=None, seed=None,
           p: float = 0.0, out_dtype=None, out=None, fast_launch: bool = True) -> torch.Tensor:
    """``col_scale * (add + drop(scale * pm @ q)) + bias``: pm ``(M, R)``, q ``(R, N)`` any strides -> ``(M, N)``.

    ``add`` ``(M, N)`` any strides; ``col_scale`` ``(N,)`` contiguous (None: 1); ``out`` ``(M, N)`` to write
    (may be ``add`` itself: each element is read before it is written), else a new tensor in ``out_dtype``
    (default pm's); ``fast_launch`` as ``KernelOptions.fast_launch``.
    """
    M, R = pm.shape
    N = q.shape[1]
    if out is None:
        out = torch.empty((M, N), device=pm.device, dtype=out_dtype or pm.dtype)
    if M == 0 or N == 0:
        return out
    cin = add if add is not None else out
    ptrs = (pm, q, bias if bias is not None else out, cin, out, seed_tensor(seed, pm.device),
            col_scale if col_scale is not None else out)
    sig = ("expand", pm.get_device(), M, N, R, pm.stride(), q.stride(), pm.dtype, q.dtype, out.dtype, out.stride(),
           None if bias is None else bias.dtype, None if add is None else (add.stride(), add.dtype),
           None if col_scale is None else col_scale.dtype, scale, p)
    if run_cached(sig, ptrs, fast=fast_launch):
        return out
    drop = p > 0.0
    BR = rank_block(R)
    in_place = add is not None and out.data_ptr() == add.data_ptr()
    launch(
        "expand_in_place" if in_place else "expand", _expand_tuned_in_place if in_place else _expand_tuned,
        _expand_kernel,
        lambda meta: (cdiv(M, meta["BM"]), cdiv(N, meta["BN"])), dict(BM=16, BN=32),
        (m_bucket(M), N, R, drop, add is not None, col_scale is not None, pm.dtype, out.dtype),
        ptrs,
        (M, N, R,
         pm.stride(0), pm.stride(1), q.stride(0), q.stride(1), cin.stride(0), cin.stride(1),
         out.stride(0), out.stride(1),
         float(scale), float(p), 1.0 / (1.0 - p) if drop else 1.0),
        dict(HAS_BIAS=bias is not None, HAS_ADD=add is not None, HAS_SCALE=col_scale is not None, DROP=drop,
             DOT_PREC=dot_prec(pm.dtype), BR=BR),
        sig, fast_launch,
    )
    return out
