"""The LoRA linear in plain PyTorch: the semantics every Triton kernel of this package implements, and
the path ``lora.py`` runs where the kernels do not (no Triton, or a device they do not cover).

With ``s = scale``, ``p`` the inverted-dropout probability and ``keep`` a bool mask drawn from ``seed``
(``reference_keep``), ``drop(t) = t * keep / (1 - p)``:

    forward, "pre" (``post=False``):  xa = drop(x) A^T            y = base + s * xa B^T
    forward, "post" (``post=True``):  xa = x A^T                  y = base + drop(s * xa B^T)
    base = x W^T + b  (``weight`` given), or the caller's ``base_out`` (+ b where given: ``lora_add``'s
           folded lora_B bias)
    DoRA (``col_scale`` f (N,) given): y = f * (x W^T + <term>) + b, or f * (base_out + <term>) + b

    DoRA's backward epilogue (``reference_dora_grad``), y = f * z + b:
        dz = dy * f                  (then the backward below runs on dz)
        dm = sum_i dy_ij z_ij / norm_j,  z = (y - b) / f, recomputed as x W^T + <term> where f is 0

    backward, with dyd = dy (pre) or drop(dy) (post, the same mask as forward):
        dx = dy W + s * ((dyd B) A) [* keep / (1 - p) for pre]   (the dy W term only when ``weight`` is given)
        dA = s * (dyd B)^T drop(x)   (x for post)
        dB = s * dyd^T xa

Shapes: x ``(M, K)``, weight ``(N, K)`` or None, bias ``(N,)`` or None, base_out ``(M, N)`` or None,
A ``(r, K)``, B ``(N, r)``, xa ``(M, r)``, dy ``(M, N)``; the keep-mask is ``(M, K)`` for pre and
``(M, N)`` for post.  Compute runs in x's dtype (A and B are cast to it); dA and dB are accumulated in
float32 and returned in A's and B's own dtypes (fp32 master weights).  The output is in base_out's dtype
where base_out is given, else x's.

The gated product of an MLP (``silu_mul.py``), ``act`` SiLU or the tanh GELU, g, u, h, dh ``(..., I)``:

    forward:   h  = act(g) * u
    backward:  du = dh * act(g)        dg = act'(g) * (dh * u)

computed with the very ops autograd runs for ``act(g) * u`` (``silu_backward`` / ``gelu_backward``), so
forward and gradients equal autograd's bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_keep(seed: torch.Tensor, M: int, D: int, p: float, device) -> torch.Tensor:
    """The ``(M, D)`` bool keep-mask of the reference path: ``rand >= p`` from a generator seeded with ``seed``
    (a one-element int64 tensor).  The Triton path derives its own mask from the same seed (Philox)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed.item()))
    return torch.rand((M, D), generator=g, device=device) >= p


def reference_forward(x, weight, bias, base_out, A, B, scale: float, p: float, post: bool, seed, col_scale=None):
    """``(y (M, N), xa (M, r))`` as the module docstring gives them; ``seed`` is used only when ``p > 0``;
    ``col_scale`` (N,): DoRA's f (the scale and the bias in fp32, fp64 for fp64 x, rounded once)."""
    cdt = x.dtype
    A_c, B_c = A.to(cdt), B.to(cdt)
    M, K = x.shape
    xd = x
    if p > 0.0 and not post:
        xd = x * reference_keep(seed, M, K, p, x.device).to(cdt) / (1.0 - p)
    xa = xd @ A_c.t()
    lr = (xa @ B_c.t()) * scale
    if p > 0.0 and post:
        lr = lr * reference_keep(seed, M, lr.shape[1], p, x.device).to(cdt) / (1.0 - p)
    if col_scale is not None:
        acc = torch.promote_types(cdt, torch.float32)
        z = (F.linear(x, weight) if base_out is None else base_out).to(acc) + lr.to(acc)
        y = z * col_scale.to(acc) + (0.0 if bias is None else bias.to(acc))
        return y.to(cdt if base_out is None else base_out.dtype), xa
    if base_out is None:
        return F.linear(x, weight, bias) + lr, xa
    if bias is not None:
        lr = lr + bias
    return (base_out + lr).to(base_out.dtype), xa


def reference_backward(dy, x, weight, A, B, xa, scale: float, p: float, post: bool, seed,
                       need_dx: bool, need_dA: bool, need_dB: bool):
    """``(dx (M, K), dA (r, K), dB (N, r))`` as the module docstring gives them; a gradient not asked for
    (``need_*`` False) is None.  ``weight`` None: dx has the adapter's part only (the caller's base has
    its own autograd)."""
    cdt = x.dtype
    A_c, B_c = A.to(cdt), B.to(cdt)
    M, K = x.shape
    N = dy.shape[1]
    dyd = dy
    if p > 0.0 and post:
        dyd = dy * reference_keep(seed, M, N, p, x.device).to(cdt) / (1.0 - p)
    keep_pre = None
    if p > 0.0 and not post and (need_dx or need_dA):
        keep_pre = reference_keep(seed, M, K, p, x.device).to(cdt) / (1.0 - p)
    dx = dA = dB = None
    dyB = dyd @ B_c if (need_dx or need_dA) else None
    if need_dx:
        lr = (dyB @ A_c) * scale
        if keep_pre is not None:
            lr = lr * keep_pre
        dx = lr if weight is None else dy @ weight + lr
    if need_dA:
        xd = x if keep_pre is None else x * keep_pre
        dA = ((dyB.t().float() @ xd.float()) * scale).to(A.dtype)
    if need_dB:
        dB = ((dyd.t().float() @ xa.float()) * scale).to(B.dtype)
    return dx, dA, dB


def reference_dora_grad(dy, y, f, bias, norm, x, weight, xa, B, scale: float, p: float, post: bool, seed):
    """``(dz (M, N) in dy's dtype, dm (N,) fp32, fp64 for fp64 dy)`` of DoRA's backward epilogue (module
    docstring); x, weight, xa, B and the post-dropout mask (``p`` > 0 with ``post``) serve only the columns whose
    f is 0."""
    acc = torch.promote_types(dy.dtype, torch.float32)
    f = f.to(acc)
    dz = (dy.to(acc) * f).to(dy.dtype)
    zero = f == 0
    z = (y.to(acc) - (0.0 if bias is None else bias.to(acc))) / torch.where(zero, 1.0, f)
    cols = zero.nonzero()[:, 0]  # (Z,)
    if cols.numel():
        lr = scale * (xa.to(acc) @ B[cols].to(acc).t())  # (M, Z)
        if p > 0.0 and post:
            lr = lr * reference_keep(seed, x.shape[0], dy.shape[1], p, x.device)[:, cols] / (1.0 - p)
        z[:, cols] = x.to(acc) @ weight[cols].to(acc).t() + lr
    return dz, (dy.to(acc) * z).sum(0) / norm.to(acc)


# The gated activations by name: (forward, backward given (d act(g), g)), as autograd computes them.
GATED_ACTIVATIONS = {
    "silu": (F.silu, torch.ops.aten.silu_backward),
    "gelu_tanh": (lambda g: F.gelu(g, approximate="tanh"),
                  lambda da, g: torch.ops.aten.gelu_backward(da, g, approximate="tanh")),
}


def reference_act_mul(g: torch.Tensor, u: torch.Tensor, activation: str) -> torch.Tensor:
    """``h = act(g) * u`` (``(..., I)``), ``act`` named by ``activation`` (a key of ``GATED_ACTIVATIONS``)."""
    return GATED_ACTIVATIONS[activation][0](g) * u


def reference_act_mul_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor | None, activation: str,
                               need_dg: bool, need_du: bool):
    """``(dg, du)`` of `reference_act_mul` for the upstream gradient ``dh``; a gradient not asked for is None
    (``u`` may then be None: only dg reads it)."""
    act, act_backward = GATED_ACTIVATIONS[activation]
    dg = act_backward(dh * u, g) if need_dg else None
    du = dh * act(g) if need_du else None
    return dg, du
