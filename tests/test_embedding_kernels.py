"""The fused LoRA embedding (`kernels/embedding_lora.py`, and `EmbeddingLoRA` on it) against a float64 reference
written here: the output and the gradients of A and B; determinism of the backward.

Runs in three modes:
    pytest tests/test_embedding_kernels.py                        # CPU: only the PyTorch-path checks run
    TRITON_INTERPRET=1 pytest tests/test_embedding_kernels.py     # the Triton kernels in the interpreter (fp32, fp16)
    pytest tests/test_embedding_kernels.py  (on a CUDA machine)   # + bf16 at vocab 128256 x 4096, 4096 tokens, r 16
Tests named *_interp run only under the interpreter, *_cuda only with a GPU.

Tolerances (``TOL``: normwise ``||a - e|| / ||e||`` and elementwise ``|a - e| <= elem * max|e|``, against float64
on the same rounded inputs). The kernels form every product exactly (fp16 / bf16 operands in tf32 or fp32 dots,
fp32 ones in ieee fp32) and accumulate in fp32, then round y, dA and dB once to their dtype; so each element is
off by at most half a unit of that format (fp16 4.9e-4, bf16 3.9e-3 relative to the element, hence to max|e|)
plus fp32 accumulation over <= T * D terms (~1e-6 here):
  fp32: 2e-6 / 2e-5 (as tests/test_kernels.py: fp32 accumulation, measured ~1e-7);
  fp16: 6e-4 / 1e-3 (one rounding: 4.9e-4 at most; measured ~3e-4);
  bf16: 5e-3 / 8e-3 (one rounding: 3.9e-3 at most).
A wrong term (a missing scale, the padding column's gradient, a count not divided by) is off by > 1e-1.
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

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not (INTERPRET and HAS_TRITON), reason="needs TRITON_INTERPRET=1 and triton")
cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")

TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (6e-4, 1e-3), torch.bfloat16: (5e-3, 8e-3)}
V, D = 37, 45  # odd: no tile divides them


check = reference_check(TOL)


def reference(ids, E_rows, A, B, c, dy, padding_idx=None, freq=False):
    """float64 ``(y, dA, dB)`` written out: y = E[x] + c A[:, x]^T B^T; dB = c dy^T a; dA[:, v] = c w_v sum over
    the tokens of v of dy B (w_v = 1 / count(v) with ``freq``, 0 at ``padding_idx``). ``E_rows``: E[ids]."""
    ids, A, B, dy = ids.reshape(-1), A.double(), B.double(), dy.double().reshape(ids.numel(), -1)
    a = A[:, ids].t()  # (T, r)
    y = E_rows.double().reshape(ids.numel(), -1) + c * a @ B.t()
    dB = c * dy.t() @ a
    w = torch.ones(ids.numel(), dtype=torch.float64, device=ids.device)
    if freq:
        w = w / torch.bincount(ids, minlength=A.shape[1])[ids].double()
    if padding_idx is not None:
        w = w * (ids != padding_idx)
    dA = torch.zeros_like(A).index_add_(1, ids, (c * (dy @ B) * w[:, None]).t())
    return y, dA, dB


def ids_with_repeats(shape, vocab, pad=None):
    """Random ids with a long run of one id, a few of another, and the padding id where given."""
    ids = torch.randint(0, vocab, shape)
    flat = ids.view(-1)
    flat[: flat.numel() // 3] = 5  # a run far longer than a tile
    flat[1::7] = vocab - 1
    if pad is not None:
        flat[2::5] = pad
    return ids


def run(dtype, rank, padding_idx, freq, ids, lora_dtype=None, scale=0.7):
    """The kernel path's ``(y, dA, dB)`` and the float64 reference for random E, A, B and dy."""
    lora_dtype = lora_dtype or dtype
    E = torch.randn(V, D, dtype=dtype)
    A = torch.randn(rank, V, dtype=lora_dtype, requires_grad=True)
    B = torch.randn(D, rank, dtype=lora_dtype, requires_grad=True)
    y = embedding_lora(ids, E, A, B, scale, padding_idx=padding_idx, scale_grad_by_freq=freq)
    assert type(y.grad_fn).__name__.startswith("_EmbeddingLoRAFunction"), "the kernel path did not run"
    dy = torch.randn_like(y)
    dA, dB = torch.autograd.grad(y, (A, B), dy)
    expected = reference(ids, E[ids], A.detach(), B.detach(), scale, dy, padding_idx, freq)
    return (y.reshape(ids.numel(), D), dA, dB), expected


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 8, 16])
@pytest.mark.parametrize("padding_idx,freq", [(None, False), (3, False), (0, True)])
def test_kernel_matches_the_float64_reference_interp(dtype, rank, padding_idx, freq):
    ids = ids_with_repeats((3, 29), V, padding_idx)  # (B, T), 87 tokens: several tiles and dB splits
    (y, dA, dB), (ey, edA, edB) = run(dtype, rank, padding_idx, freq, ids)
    assert dA.dtype == dtype and dB.dtype == dtype
    check(y, ey, dtype, "y")
    check(dA, edA, dtype, "grad lora_embedding_A")
    check(dB, edB, dtype, "grad lora_embedding_B")
    if padding_idx is not None:
        assert not dA[:, padding_idx].any(), "the adapter's padding column got a gradient"
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[ids.flatten()] = False
    assert not dA[:, untouched].any(), "a column of an id not in the batch got a gradient"


@interp_only
@pytest.mark.parametrize("shape", [(5,), (70,)])
def test_a_rank_over_one_block_and_a_single_split_interp(shape):
    """r = 70: two rank blocks of 64 (the forward loops over them, the backward grids over them); 5 tokens:
    one dB split (written straight in B's dtype)."""
    ids = ids_with_repeats(shape, V)
    (y, dA, dB), (ey, edA, edB) = run(torch.float32, 70, None, False, ids)
    for name, a, e in (("y", y, ey), ("dA", dA, edA), ("dB", dB, edB)):
        check(a, e, torch.float32, name)


@interp_only
def test_fp32_adapters_on_an_fp16_table_interp():
    """`lora_dtype=float32` on an fp16 table: y in fp16, the gradients in fp32 (ieee dots for the fp32 operands)."""
    ids = ids_with_repeats((2, 13), V)
    (y, dA, dB), (ey, edA, edB) = run(torch.float16, 8, None, False, ids, lora_dtype=torch.float32)
    assert y.dtype == torch.float16 and dA.dtype == dB.dtype == torch.float32
    check(y, ey, torch.float16, "y")
    check(dA, edA, torch.float32, "dA")
    check(dB, edB, torch.float32, "dB")


@interp_only
def test_transposed_table_and_adapters_interp():
    """Views with a column stride other than 1 (a table stored (D, V), adapters stored transposed) are read in
    place through their strides."""
    ids = ids_with_repeats((2, 11), V)
    E = torch.randn(D, V).t()
    A = torch.randn(V, 8).t().requires_grad_()
    B = torch.randn(8, D).t().requires_grad_()
    y = embedding_lora(ids, E, A, B, 0.5)
    dy = torch.randn_like(y)
    dA, dB = torch.autograd.grad(y, (A, B), dy)
    ey, edA, edB = reference(ids, E[ids], A.detach(), B.detach(), 0.5, dy)
    for name, a, e in (("y", y.reshape(-1, D), ey), ("dA", dA, edA), ("dB", dB, edB)):
        check(a, e, torch.float32, name)


@interp_only
def test_two_backward_passes_are_bit_identical_interp():
    ids = ids_with_repeats((4, 31), V, pad=2)
    E = torch.randn(V, D, dtype=torch.float16)
    A = torch.randn(16, V, dtype=torch.float16, requires_grad=True)
    B = torch.randn(D, 16, dtype=torch.float16, requires_grad=True)
    dy = torch.randn(4, 31, D, dtype=torch.float16)
    grads = [torch.autograd.grad(embedding_lora(ids, E, A, B, 2.0, padding_idx=2, scale_grad_by_freq=True), (A, B), dy)
             for _ in range(2)]
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads, strict=True)), "two backward passes differ"


class ScaledEmbedding(nn.Embedding):
    """Gemma's scaled embedding: the rows times a buffer ``embed_scale``."""

    def __init__(self, *args, embed_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, input_ids):
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


@interp_only
@pytest.mark.parametrize("cls", [nn.Embedding, ScaledEmbedding])
def test_the_module_runs_the_kernel_and_matches_its_pytorch_path_interp(cls):
    """`EmbeddingLoRA` with `use_triton` runs the kernel (a plain table gathered in it; a scaled embedding's own
    forward first, the adapter term scaled by `embed_scale` as PEFT does) and agrees with `use_triton=False`."""
    kwargs = {"embed_scale": 3.0} if cls is ScaledEmbedding else {}
    torch.manual_seed(1)
    fused = cls(V, D, padding_idx=4, scale_grad_by_freq=True, **kwargs)
    plain = cls(V, D, padding_idx=4, scale_grad_by_freq=True, **kwargs)
    plain.load_state_dict(fused.state_dict())
    for emb, use_triton in ((fused, True), (plain, False)):
        patch_embedding_module(emb, dim=8, alpha=16, use_triton=use_triton)
        assert emb.lora_use_triton is use_triton
    with torch.no_grad():
        fused.lora_embedding_A.normal_()
        plain.lora_embedding_A.copy_(fused.lora_embedding_A)
        plain.lora_embedding_B.copy_(fused.lora_embedding_B)
    ids = ids_with_repeats((2, 19), V, pad=4)
    y, y_ref = fused(ids), plain(ids)
    assert type(y.grad_fn).__name__.startswith("_EmbeddingLoRAFunction")
    assert not type(y_ref.grad_fn).__name__.startswith("_EmbeddingLoRAFunction")
    c = fused.lora_settings.scale * kwargs.get("embed_scale", 1.0)
    dy = torch.randn_like(y)
    ey, edA, edB = reference(ids, fused.weight.detach()[ids] * kwargs.get("embed_scale", 1.0),
                             fused.lora_embedding_A.detach(), fused.lora_embedding_B.detach(), c, dy, 4, True)
    y.backward(dy)
    y_ref.backward(dy)
    assert fused.weight.grad is None, "the base table is frozen"
    for emb in (fused, plain):  # both paths against float64 (the PyTorch path rounds a few times more)
        check(emb(ids).reshape(-1, D), ey, torch.float32, "y")
        check(emb.lora_embedding_A.grad, edA, torch.float32, "grad lora_embedding_A")
        check(emb.lora_embedding_B.grad, edB, torch.float32, "grad lora_embedding_B")


@interp_only
def test_ids_out_of_range_raise_and_no_ids_give_zero_gradients_interp():
    E, A, B = torch.randn(V, D), torch.randn(4, V, requires_grad=True), torch.randn(D, 4, requires_grad=True)
    with pytest.raises(IndexError, match=rf"embedding ids must lie in \[0, {V}\)"):
        embedding_lora(torch.tensor([0, V]), E, A, B, 1.0)
    y = embedding_lora(torch.zeros(0, 3, dtype=torch.long), E, A, B, 1.0)
    assert y.shape == (0, 3, D)
    dA, dB = torch.autograd.grad(y, (A, B), torch.zeros_like(y))
    assert not dA.any() and not dB.any()


def test_max_norm_sparse_and_use_triton_false_take_the_pytorch_path():
    """Everywhere (CPU without the interpreter: the kernels do not run at all)."""
    ids = torch.tensor([[1, 2, 2, 6]])
    for kwargs, use_triton in (({"max_norm": 1.0}, True), ({"sparse": True}, True), ({}, False)):
        emb = patch_embedding_module(nn.Embedding(9, 5, **kwargs), dim=2, use_triton=use_triton)
        assert not type(emb(ids).grad_fn).__name__.startswith("_EmbeddingLoRAFunction"), kwargs


def llama3_vocabulary_case(dtype=torch.bfloat16, dev="cuda", rank=16):
    """(E, A, B, ids, dy) at vocab 128256 x 4096, 2 x 2048 tokens (the shape of benchmarks/DESIGN.md section 13):
    A and B requiring grad, id 128000 repeated (a BOS-like token), every 9th id of the second row 0 (padding)."""
    vocab, dim = 128256, 4096
    E = torch.randn(vocab, dim, device=dev, dtype=dtype)
    A = torch.randn(rank, vocab, device=dev, dtype=dtype, requires_grad=True)
    B = (torch.randn(dim, rank, device=dev) / 4).to(dtype).requires_grad_()
    ids = torch.randint(0, vocab, (2, 2048), device=dev)
    ids[0, :300] = 128000
    ids[1, ::9] = 0
    return E, A, B, ids, torch.randn(2, 2048, dim, device=dev, dtype=dtype)


@cuda_only
def test_bf16_at_llama3_s_vocabulary_cuda():
    """bf16, vocab 128256 x 4096, 2 x 2048 tokens, r = 16 (the shape of benchmarks/DESIGN.md section 13)."""
    dtype, dim = torch.bfloat16, 4096
    E, A, B, ids, dy = llama3_vocabulary_case(dtype)
    y = embedding_lora(ids, E, A, B, 2.0, padding_idx=0)
    assert type(y.grad_fn).__name__.startswith("_EmbeddingLoRAFunction")
    grads = [torch.autograd.grad(y, (A, B), dy, retain_graph=True) for _ in range(2)]
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads, strict=True)), "two backward passes differ"
    ey, edA, edB = reference(ids, E[ids], A.detach(), B.detach(), 2.0, dy, 0)
    check(y.reshape(-1, dim), ey, dtype, "y")
    check(grads[0][0], edA, dtype, "grad lora_embedding_A")
    check(grads[0][1], edB, dtype, "grad lora_embedding_B")
    assert not grads[0][0][:, 0].any()


def test_blocks_are_powers_of_two():
    if not HAS_TRITON:
        pytest.skip("needs triton")
    for blocks in (EK._FWD, EK._DYB, EK._DB):
        assert all(b >= 16 and b & (b - 1) == 0 for b in blocks.values()), blocks  # tl.dot needs >= 16
