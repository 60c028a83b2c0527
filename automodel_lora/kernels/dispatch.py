"""The Triton path of one LoRA layer call: which kernels run, for given operands and ``KernelOptions``.

Shapes (2-D after flattening): x ``(M, K)``, weight ``(N, K)``, bias ``(N,)``, A ``(r, K)``,
B ``(N, r)``, dy ``(M, N)``; ``s`` the scale.

    forward   xa = drop_pre(x) A^T                          (M, r)   proj, or made by the TMA GEMM
              y  = x W^T + b + drop_post(s xa B^T)           (M, N)   a base-GEMM route, below
    backward  dyB = drop_post(dy) B                         (M, r)   proj, or made by the TMA GEMM
              dx  = dy W + drop_pre(s dyB A)                 (M, K)   a base-GEMM route
              dA, dB = s dyB^T drop_pre(x), s drop_post(dy)^T xa     tn2 (one launch) or tn

Routes of the base GEMM (``forward_route`` / ``dx_route``, pure functions of shapes, dtypes, strides,
device and options; tests ask them which kernels a call takes):

    "fused_proj"  one TMA GEMM launch that also makes xa / dyB (``gemm_lora_proj``; no dropout)
    "tma"         proj, then the TMA GEMM with the low-rank term as an extra K step
    "portable"    proj, then the portable Triton GEMM with that K step
    "cublas"      proj, then the low-rank term written by ``expand`` and cuBLAS's ``addmm_`` on top (beta=1)
    "add"         (forward, ``lora_add``) proj, then ``expand`` adding to the caller's base output
    "adapter"     (dx, ``lora_add``) proj, then ``expand``: the adapter's part of dx only

DoRA (a column scale f (N,), ``col_scale``): the forward takes the same routes, f applied before the bias in the
epilogue of the kernel that writes y (the Triton GEMMs, ``expand``); on "cublas" the order turns round: cuBLAS
writes ``x W^T`` first, then ``expand`` reads it and writes ``f * (x W^T + drop_post(s xa B^T)) + b`` in place
(the same bytes).  The backward's ``dz = dy * f`` comes from ``dora_grad``, then takes the routes above.
"""

from __future__ import annotations

from .expand import expand
from .grad_ab import tn, tn2
from .launch import sm_count
from .options import KernelOptions, all_programs_resident
from .proj import proj
from .tma_desc import tma_eligible_proj, tma_operands_ready
from .tma_gemm import gemm_lora, gemm_lora_proj, proj_tiles_fit

# "auto" takes the TMA GEMM (ranks up to 64, where it has one rank tile) from this GEMM size (M * K * N)
# on.  Measured on an H100 side by side with the cuBLAS path (benchmarks/DESIGN.md), after the launch
# path stopped costing more host time than cuBLAS's:
#   * 8B-shaped 4-layer model, M = 4096 (GEMMs 1.7e10 (k/v) to 2.4e11): 0.966x of frozen throughput
#     with TMA wherever it applies, 0.935x with cuBLAS;
#   * layer, M = 8192: 4096^2 (1.4e11) 1.20x / 1.24x (r=16 / r=64) against 1.24x / 1.30x; at 4.8e11
#     (4096 x 14336, 14336 x 4096) 1.06x-1.12x against 1.10x-1.15x.
# Smaller GEMMs were not measured; there the 128 x 256 tiles leave SMs idle, so cuBLAS keeps them.
AUTO_TMA_MIN_MNK = 2**34  # 1.7e10: the k/v projections of an 8B model at 4096 tokens

_RESIDENT: dict = {}


def fused_proj_safe(device) -> bool:
    """Whether every program of a persistent grid on ``device`` can be resident (``all_programs_resident``
    with this process's environment), decided once per device; always on the CPU interpreter, which runs
    the programs one after another.  Only the MPS thread-percentage cap is seen here: no ``free_sms`` is
    passed, since torch reports the whole device inside a green-context partition; there the user turns
    the fused projection off (``KernelOptions(fuse_proj=False)``)."""
    if device.type != "cuda":
        return True
    ok = _RESIDENT.get(device.index)
    if ok is None:
        ok = _RESIDENT[device.index] = all_programs_resident(sm_count(device))
    return ok


def base_gemm_route(x, y, q, rank: int, base_gemm: str, auto_min_mnk: int = AUTO_TMA_MIN_MNK) -> str:
    """How ``x @ y`` (x ``(M, K)``, y ``(K, N)``) takes a low-rank term ``pm @ q`` (pm ``(M, rank)`` as ``proj``
    makes it, q ``(rank, N)``) under ``base_gemm``: "cublas", "tma" or "portable"."""
    if base_gemm == "cublas":
        return "cublas"
    if base_gemm == "triton":
        return "tma" if tma_operands_ready(x, y, q, rank) else "portable"
    # "auto": the size test first, so small GEMMs (most calls of a small model) skip the layout checks
    if x.shape[0] * x.shape[1] * y.shape[1] < auto_min_mnk or not tma_operands_ready(x, y, q, rank):
        return "cublas"
    return "tma"


def fuses_proj(x, y, rop, q, options: KernelOptions, *, n_sm: int | None = None,
               auto_min_mnk: int = AUTO_TMA_MIN_MNK) -> bool:
    """Whether ``x @ y`` with the low-rank term ``(x @ rop) @ q`` runs as one ``gemm_lora_proj`` launch: the
    options allow it, the base GEMM route would be the TMA kernel, that kernel can take ``rop`` as well, and
    every program of its grid can be resident.  With "auto", only where the schedule's idle time holds the
    projection tiles (``proj_tiles_fit`` on ``n_sm`` SMs, default the device's)."""
    if not options.fuse_proj or options.base_gemm == "cublas":
        return False
    if options.base_gemm == "auto":
        if x.shape[0] * x.shape[1] * y.shape[1] < auto_min_mnk:
            return False
        if not proj_tiles_fit(x.shape[0], y.shape[1], sm_count(x.device) if n_sm is None else n_sm):
            return False
    return tma_eligible_proj(x, y, rop, q) and fused_proj_safe(x.device)


def forward_route(x, weight, base_out, A, B, p: float, post: bool, options: KernelOptions) -> str:
    """The route of the forward's base GEMM (see the module docstring)."""
    if base_out is not None:
        return "add"
    wt, bt = weight.t(), B.t()
    if p == 0.0 and fuses_proj(x, wt, A.t(), bt, options):
        return "fused_proj"
    if post and p > 0.0:  # the post-dropout mask applies to the low-rank term alone: expand applies it
        return "cublas"
    return base_gemm_route(x, wt, bt, A.shape[0], options.base_gemm)


def dx_route(dy, weight, A, B, p: float, post: bool, options: KernelOptions) -> str:
    """The route of the backward's dx GEMM (see the module docstring); ``weight`` None for ``lora_add``."""
    if weight is None:
        return "adapter"
    if p == 0.0 and fuses_proj(dy, weight, B, A, options):
        return "fused_proj"
    if p > 0.0 and not post:  # the pre-dropout mask applies to the low-rank term alone
        return "cublas"
    return base_gemm_route(dy, weight, A, B.shape[1], options.base_gemm)


def triton_forward(x, weight, bias, base_out, A, B, scale, p, post, seed, options: KernelOptions, col_scale=None):
    """``(y, xa)`` of the layer: y ``(M, N)`` (base_out's dtype for ``lora_add``, else x's), xa ``(M, r)``;
    ``col_scale`` ``(N,)`` fp32 (DoRA's f; never with "pre" dropout): y = f * (base + term) + bias."""
    # A, B go to the kernels in their own dtype (fp32 masters too): the kernels cast the adapter
    # tiles to x's dtype after loading, so no per-step cast kernel runs
    fast = options.fast_launch
    route = forward_route(x, weight, base_out, A, B, p, post, options)
    f = col_scale
    if route == "fused_proj":  # (y, xa) in one launch
        return gemm_lora_proj(x, weight.t(), A.t(), B.t(), scale, bias=bias, eligible=True, col_scale=f,
                              fast_launch=fast)
    xa = proj(x, A.t(), seed=None if post else seed, p=0.0 if post else p, fast_launch=fast)  # (M, r)
    post_seed, post_p = (seed, p) if post else (None, 0.0)
    if route == "add":  # lora_add: one pass writing base_out + low-rank term (+ bias: lora_B's, folded)
        y = expand(xa, B.t(), scale, bias=bias, add=base_out, col_scale=f, seed=post_seed, p=post_p,
                   out_dtype=base_out.dtype, fast_launch=fast)
        return y, xa
    wt, bt = weight.t(), B.t()
    if route == "cublas" and f is not None:  # x W^T first, then one pass scaling it with the term added
        y = x @ wt  # (M, N), cuBLAS
        expand(xa, bt, scale, bias=bias, add=y, col_scale=f, seed=post_seed, p=post_p, out=y, fast_launch=fast)
    elif route == "cublas":
        y = expand(xa, bt, scale, bias=bias, seed=post_seed, p=post_p, fast_launch=fast)
        y.addmm_(x, wt)  # cuBLAS, low-rank term accumulated through beta=1
    else:
        y = gemm_lora(x, wt, xa, bt, scale, bias=bias, tma=route == "tma", col_scale=f, fast_launch=fast)
    return y, xa


def _grad_dx(route, dy, weight, A, dyB, scale, seed, pre_p, fast):
    """dx ``(M, K)`` from dyB ``(M, r)`` on a non-fused route."""
    if route in ("tma", "portable"):
        return gemm_lora(dy, weight, dyB, A, scale, tma=route == "tma", fast_launch=fast)
    dx = expand(dyB, A, scale, seed=seed if pre_p else None, p=pre_p, fast_launch=fast)
    if route == "cublas":
        dx.addmm_(dy, weight)
    return dx


def triton_backward(dy, x, weight, A, B, xa, scale, p, post, seed, need_dx, need_dA, need_dB,
                    options: KernelOptions):
    """``(dx, dA, dB)`` of the layer (None where not needed); dA, dB in the adapters' dtypes."""
    fast = options.fast_launch
    pre_p = p if p > 0.0 and not post else 0.0
    post_p = p if p > 0.0 and post else 0.0
    dx = dA = dB = None
    dyB = None
    route = dx_route(dy, weight, A, B, p, post, options) if need_dx else None
    if route == "fused_proj":
        dx, dyB = gemm_lora_proj(dy, weight, B, A, scale, eligible=True, fast_launch=fast)  # dyB made in the dx GEMM
    elif need_dx or need_dA:
        dyB = proj(dy, B, seed=seed if post_p else None, p=post_p, fast_launch=fast)  # (M, r)
    if need_dx and dx is None:
        dx = _grad_dx(route, dy, weight, A, dyB, scale, seed, pre_p, fast)
    if need_dA and need_dB:  # one launch for both weight gradients
        dA, dB = tn2(dyB, x, xa, dy, scale, seed=seed, p_a=pre_p, p_b=post_p, dtype_a=A.dtype, dtype_b=B.dtype,
                     fast_launch=fast)
        return dx, dA, dB
    if need_dA:
        dA = tn(dyB, x, scale, seed=seed if pre_p else None, p=pre_p, out_dtype=A.dtype, fast_launch=fast)
    if need_dB:
        dB = tn(xa, dy, scale, seed=seed if post_p else None, p=post_p, transpose_out=True, out_dtype=B.dtype,
                fast_launch=fast)
    return dx, dA, dB
