"""DoRA on the fused LoRA embedding (`kernels/embedding_lora.py` with a magnitude, and `EmbeddingLoRA` with
`use_dora` on it) against a float64 reference written here: y, the gradients of A, B and the magnitude m.

Runs in three modes:
    pytest tests/test_embedding_dora_kernels.py                       # CPU: only the PyTorch-path checks run
    TRITON_INTERPRET=1 pytest tests/test_embedding_dora_kernels.py    # the Triton kernels in the interpreter
    pytest tests/test_embedding_dora_kernels.py  (on a CUDA machine)  # + bf16 at vocab 128256 x 4096, r 16
Tests named *_interp run only under the interpreter, *_cuda only with a GPU.

The reference takes the same rounded inputs (E, A, B, m, and the fp32 norm the kernel is given) in float64:
    f = m / norm,  z = base + c A[:, x]^T B^T,  y = f z,  dz = dy f,
    dB = c dz^T a,  dA[:, v] = c w_v sum_{t: x_t = v} dz[t] B,  dm = sum_t dy z / norm.
Tolerances (``TOL``: normwise ``||a - e|| / ||e||`` and elementwise ``|a - e| <= elem * max|e|``): beside the one
rounding of each output to its dtype (``tests/test_embedding_kernels.py``), DoRA adds one rounding of half a unit
of the format per term: dz = dy * f is rounded to dy's dtype before the products of dA and dB (as the linear
DoRA path's dz), and dm reads z = y / f from y, rounded to y's dtype. Two roundings per element; bounds on the
typical error (the roundings of a sum over many tokens are random; a worst-case bound over the sum of |dy z|
would be ~50x looser at 4096 tokens):
  fp32: 2e-6 / 2e-5 (fp32 accumulation, as the plain kernel's tests);
  fp16: 1e-3 / 2e-3 (two roundings of at most 4.9e-4 each);
  bf16: 8e-3 / 1.6e-2 (two roundings of at most 3.9e-3 each).
A wrong term (f not applied to dy, dm of a zero magnitude left at 0, a missing norm) is off by > 1e-1.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from automodel_lora.embedding_lora import patch_embedding_module
from automodel_lora.kernels import HAS_TRITON
from automodel_lora.kernels import embedding_lora as EK
from automodel_lora.kernels.embedding_lora import embedding_lora

from .conftest import reference_check
from .test_embedding_kernels import ScaledEmbedding, ids_with_repeats, llama3_vocabulary_case

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not (INTERPRET and HAS_TRITON), reason="needs TRITON_INTERPRET=1 and triton")
cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")

TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (8e-3, 1.6e-2)}
V, D = 37, 29  # odd: no tile divides them
ZERO = 7  # the column whose magnitude is 0

check = reference_check(TOL)


def reference(ids, base_rows, A, B, c, m, norm, dy, padding_idx=None, freq=False):
    """float64 ``(y, dA, dB, dm)`` (module docstring); ``base_rows``: the base lookup ``(*ids.shape, D)``."""
    ids, A, B = ids.reshape(-1), A.double(), B.double()
    T = ids.numel()
    f = m.double() / norm.double()  # (D,)
    a = A[:, ids].t()  # (T, r)
    z = base_rows.double().reshape(T, -1) + c * a @ B.t()  # (T, D)
    dy = dy.double().reshape(T, -1)
    dz = dy * f
    w = torch.ones(T, dtype=torch.float64, device=ids.device)
    if freq:
        w = w / torch.bincount(ids, minlength=A.shape[1])[ids].double()
    if padding_idx is not None:
        w = w * (ids != padding_idx)
    dA = torch.zeros_like(A).index_add_(1, ids, (c * (dz @ B) * w[:, None]).t())
    return f * z, dA, c * dz.t() @ a, (dy * z).sum(0) / norm.double()


def inputs(dtype, rank, lora_dtype=None, device="cpu"):
    """E, A, B, m (one entry 0) and a positive fp32 norm, the adapters and m requiring grad."""
    lora_dtype = lora_dtype or dtype
    E = torch.randn(V, D, dtype=dtype, device=device)
    A = torch.randn(rank, V, dtype=lora_dtype, device=device, requires_grad=True)
    B = torch.randn(D, rank, dtype=lora_dtype, device=device, requires_grad=True)
    m = (torch.rand(D, device=device) + 0.5).to(lora_dtype)
    m[ZERO] = 0
    norm = torch.rand(D, device=device) + 0.5  # any detached positive (D,): an input of the kernel
    return E, A, B, m.requires_grad_(), norm


def check_all(got, expected, dtype, lora_dtype=None):
    lora_dtype = lora_dtype or dtype
    for name, a, e, dt in zip(("y", "dA", "dB", "dm"), got, expected, (dtype, lora_dtype, lora_dtype, lora_dtype),
                              strict=True):
        check(a.reshape(e.shape), e, dt, name)
    dm, edm = got[3], expected[3]
    assert edm[ZERO] != 0, "the test needs a zero-magnitude column with a gradient"
    # relative to itself: its z is recomputed in fp32 (not read from y), so only dm's own rounding is left
    check(dm[ZERO:ZERO + 1], edm[ZERO:ZERO + 1], lora_dtype, "dm of the zero-magnitude column")
    assert not got[0].reshape(-1, D)[:, ZERO].any(), "y of a zero magnitude is not 0"


def is_kernel(y):
    return type(y.grad_fn).__name__.startswith("_EmbeddingLoRAFunction")


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 3, 16, 70])  # 70: several rank blocks (dm from the first one only)
@pytest.mark.parametrize("padding_idx,freq", [(None, False), (3, True)])
def test_dora_kernel_matches_the_float64_reference_interp(dtype, rank, padding_idx, freq):
    ids = ids_with_repeats((3, 29), V, padding_idx)  # 87 tokens: several tiles and dB / dm splits
    E, A, B, m, norm = inputs(dtype, rank)
    y = embedding_lora(ids, E, A, B, 0.7, padding_idx=padding_idx, scale_grad_by_freq=freq, magnitude=m,
                       weight_norm=norm)
    assert is_kernel(y), "the kernel path did not run"
    dy = torch.randn_like(y)
    dA, dB, dm = torch.autograd.grad(y, (A, B, m), dy)
    assert dm.dtype == m.dtype and dA.dtype == A.dtype
    expected = reference(ids, E[ids], A.detach(), B.detach(), 0.7, m.detach(), norm, dy, padding_idx, freq)
    check_all((y, dA, dB, dm), expected, dtype)
    if padding_idx is not None:
        assert not dA[:, padding_idx].any(), "the adapter's padding column got a gradient"


@interp_only
@pytest.mark.parametrize("recompute", [True, False])
def test_dora_on_a_base_output_with_embed_scale_interp(recompute):
    """A caller's base output (a scaled embedding's forward) and an embed_scale tensor: a zero magnitude's z is
    the base output again (``recompute_base``, called once in backward) or the saved base output."""
    dtype, es = torch.float16, torch.tensor(3.0)
    ids = ids_with_repeats((2, 23), V, pad=4)
    E, A, B, m, norm = inputs(dtype, 3)
    calls = []

    def base_fn():
        calls.append(1)
        return E[ids] * es.to(dtype)

    y = embedding_lora(ids, E, A, B, 0.5, padding_idx=4, scale_grad_by_freq=True, embed_scale=es,
                       base_out=base_fn(), magnitude=m, weight_norm=norm, recompute_base=base_fn if recompute else None)
    assert is_kernel(y)
    dy = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, (A, B, m), dy))
    assert len(calls) == (2 if recompute else 1), "the base output is recomputed once, and only when asked"
    check_all(got, reference(ids, E[ids] * es.to(dtype), A.detach(), B.detach(), 0.5 * 3.0, m.detach(), norm, dy,
                             4, True), dtype)


@interp_only
def test_no_zero_magnitude_needs_no_recompute_and_single_gradients_interp():
    """Without a zero magnitude the base output is never looked up again; dm alone (A and B frozen: the dB
    kernel sums only dm's numerator) and dA alone match the reference."""
    ids = ids_with_repeats((2, 19), V)
    E, A, B, m, norm = inputs(torch.float32, 16)
    with torch.no_grad():
        m[ZERO] = 1.0
    expected = reference(ids, E[ids], A.detach(), B.detach(), 0.9, m.detach(), norm, torch.ones(2, 19, D))

    def fail():
        raise AssertionError("recompute_base called without a zero magnitude")

    for wrt, idx in (((m,), (3,)), ((A,), (1,)), ((B, m), (2, 3))):
        y = embedding_lora(ids, E, A, B, 0.9, base_out=E[ids], magnitude=m, weight_norm=norm, recompute_base=fail)
        for g, i in zip(torch.autograd.grad(y, wrt, torch.ones_like(y)), idx, strict=True):
            check(g, expected[i], torch.float32, f"gradient {i}")


@interp_only
def test_two_dora_backward_passes_are_bit_identical_interp():
    ids = ids_with_repeats((4, 31), V, pad=2)
    E, A, B, m, norm = inputs(torch.float16, 16)
    dy = torch.randn(4, 31, D, dtype=torch.float16)
    grads = [torch.autograd.grad(embedding_lora(ids, E, A, B, 2.0, padding_idx=2, scale_grad_by_freq=True,
                                                magnitude=m, weight_norm=norm), (A, B, m), dy) for _ in range(2)]
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads, strict=True)), "two backward passes differ"


def _module_reference(emb, ids, dy, es):
    """float64 PEFT DoRA on the module: m / ||E^T + s B A||_row (the dense norm, detached) * (es E[x] + ...)."""
    E, A, B = emb.weight.double(), emb.lora_embedding_A.detach().double(), emb.lora_embedding_B.detach().double()
    s = emb.lora_settings.scale
    norm = (E.T + s * B @ A).norm(dim=1)  # (D,) over the vocabulary
    return reference(ids, E[ids] * es, A, B, s * es, emb.lora_magnitude_vector.detach(), norm, dy,
                     emb.padding_idx, emb.scale_grad_by_freq)


@interp_only
@pytest.mark.parametrize("cls", [nn.Embedding, ScaledEmbedding])
def test_the_dora_module_runs_the_kernel_interp(cls, monkeypatch):
    """`EmbeddingLoRA` with `use_dora` and `use_triton` runs the kernel with f (a spy on its forward and backward),
    agrees with float64 PEFT math (the norm dense in float64) and with `use_triton=False`."""
    seen = []
    fwd, bwd = EK.embedding_lora_forward, EK.embedding_lora_backward
    monkeypatch.setattr(EK, "embedding_lora_forward", lambda *a: seen.append(("fwd", a[7] is not None)) or fwd(*a))
    monkeypatch.setattr(EK, "embedding_lora_backward", lambda *a: seen.append(("bwd", a[-2] is not None)) or bwd(*a))
    es = 3.0 if cls is ScaledEmbedding else 1.0
    kwargs = {"embed_scale": es} if cls is ScaledEmbedding else {}
    torch.manual_seed(1)
    fused = cls(V, D, padding_idx=4, scale_grad_by_freq=True, **kwargs)
    plain = cls(V, D, padding_idx=4, scale_grad_by_freq=True, **kwargs)
    plain.load_state_dict(fused.state_dict())
    for emb, use_triton in ((fused, True), (plain, False)):
        patch_embedding_module(emb, dim=3, alpha=6, use_dora=True, use_triton=use_triton)
        with torch.no_grad():
            emb.lora_embedding_A.copy_(torch.randn(3, V, generator=torch.Generator().manual_seed(2)))
            emb.lora_embedding_B.copy_(torch.randn(D, 3, generator=torch.Generator().manual_seed(3)))
            emb.lora_magnitude_vector.mul_(1.3)[ZERO] = 0
    ids = ids_with_repeats((2, 19), V, pad=4)
    dy = torch.randn(2, 19, D)
    expected = _module_reference(fused, ids, dy, es)
    for emb in (fused, plain):
        y = emb(ids)
        assert is_kernel(y) is (emb is fused)
        params = (emb.lora_embedding_A, emb.lora_embedding_B, emb.lora_magnitude_vector)
        check_all((y, *torch.autograd.grad(y, params, dy)), expected, torch.float32)
        assert emb.weight.grad is None
    assert seen == [("fwd", True), ("bwd", True)], seen


@interp_only
def test_the_table_never_goes_through_saved_tensor_hooks_interp():
    """The frozen table E (needed in backward only for a zero magnitude's column) is held, not saved: a
    saved-tensor hook (``save_on_cpu``, offloading) never packs a (V, D) tensor, and the gradients still match."""
    E, A, B, m, norm = inputs(torch.float32, 3)
    ids = ids_with_repeats((2, 19), V)
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = embedding_lora(ids, E, A, B, 0.7, magnitude=m, weight_norm=norm)
    assert is_kernel(y) and packed and (V, D) not in packed, packed
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (A, B, m), dy)
    check_all((y, *grads), reference(ids, E[ids], A.detach(), B.detach(), 0.7, m.detach(), norm, dy),
              torch.float32)


@interp_only
def test_outputs_written_in_place_interp():
    """Plain LoRA's output is no view: a caller may write rows in place (multimodal models put image features
    into the embeddings so), and the gradients are those of the rows left. DoRA keeps its output for backward:
    writing it in place is autograd's error at backward, never a silent wrong gradient."""
    E, A, B, m, norm = inputs(torch.float32, 3)
    ids = ids_with_repeats((2, 19), V)
    y = embedding_lora(ids, E, A, B, 0.7)
    y[0, :5] = 1.0  # what `inputs_embeds[image_mask] = features` does
    dy = torch.randn_like(y)
    dA, dB = torch.autograd.grad(y, (A, B), dy)
    kept = dy.clone()
    kept[0, :5] = 0
    want = torch.autograd.grad(embedding_lora(ids, E, A, B, 0.7), (A, B), kept)
    torch.testing.assert_close((dA, dB), want)
    y = embedding_lora(ids, E, A, B, 0.7, magnitude=m, weight_norm=norm)
    y[0, :5] = 1.0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y, (A, B, m), dy)


def test_dora_module_without_the_kernels_takes_the_pytorch_path():
    """`use_triton=False` everywhere, and (without the interpreter) every CPU run: the PyTorch path's graph."""
    emb = patch_embedding_module(nn.Embedding(9, 5), dim=2, use_dora=True, use_triton=False)
    assert not is_kernel(emb(torch.tensor([[1, 2, 2, 6]])))


@cuda_only
def test_dora_bf16_at_llama3_s_vocabulary_cuda():
    """bf16, vocab 128256 x 4096, 2 x 2048 tokens, r = 16, one magnitude 0, against float64 on the same inputs."""
    dev, dtype = "cuda", torch.bfloat16
    E, A, B, ids, dy = llama3_vocabulary_case(dtype, dev)
    m = (torch.rand(E.shape[1], device=dev) + 0.5).to(dtype)
    m[ZERO] = 0
    m.requires_grad_()
    norm = E.float().norm(dim=0) * 1.1  # (dim,) any detached positive vector
    y = embedding_lora(ids, E, A, B, 2.0, padding_idx=0, magnitude=m, weight_norm=norm)
    assert is_kernel(y)
    grads = [torch.autograd.grad(y, (A, B, m), dy, retain_graph=True) for _ in range(2)]
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads, strict=True)), "two backward passes differ"
    expected = reference(ids, E[ids], A.detach(), B.detach(), 2.0, m.detach(), norm, dy, 0)
    check_all((y, *grads[0]), expected, dtype)
    assert not grads[0][0][:, 0].any()
