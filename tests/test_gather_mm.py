"""The gather kernel (``kernels/gather_mm.py``, Punica's BGMV) against a float64 per-row reference: under
``TRITON_INTERPRET=1`` on the CPU (fp32 / fp16, small odd shapes, ids in any order with repeats, rows without
an adapter, adapters no row uses), against ``segment_mm`` on the same rows, and in bf16 at a real decode shape
on a GPU. Argument errors and the PyTorch path run everywhere.

Tolerances, normwise relative to the float64 result of the same (rounded) inputs, as in test_segmented_lora:
fp32 accumulates in fp32 (~6e-8 per rounding over ~K terms, the norm averages many): 1e-5. fp16 accumulates
in fp32 too and rounds the output once (unit roundoff 4.9e-4, less on average over the norm): 1e-3. bf16 on
the GPU at K = 4096: the output rounded once (unit roundoff 3.9e-3) and, for the expand, its input ``xa``
rounded once more: 1e-2. A wrong row, id or layout is off by O(1).
"""

from __future__ import annotations

import os

import pytest
import torch

from automodel_lora.kernels.gather_mm import gather_mm

RUNS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
kernels = pytest.mark.skipif(not RUNS, reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _reference(x, w, ids, add=None):
    """float64 ``add[i] + x[i] @ w[ids[i]]^T``, no product for an id outside [0, G)."""
    out = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64) if add is None else add.double().clone()
    for i, g in enumerate(ids.tolist()):
        if 0 <= g < w.shape[0]:
            out[i] += w[g].double() @ x[i].double()
    return out


def _case(M, K, N, G, dtype, seed=0):
    """x (M, K), w (G, N, K), add (M, N); ids with repeats, -1 and G (no adapter), adapters G-1 and 2 unused."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(G, N, K, generator=g) / K**0.5).to(dtype)
    add = torch.randn(M, N, generator=g).to(dtype)
    used = [i for i in range(G) if i not in (2, G - 1)]
    ids = torch.tensor([used[i % len(used)] for i in range(M)])
    ids[1], ids[-2] = -1, G
    return x, w, ids[torch.randperm(M, generator=g)], add


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M, K, N, G", [
    (7, 37, 53, 5),     # odd shapes
    (9, 70, 16, 6),     # the shrink: N = r small, K several steps
    (6, 5, 130, 4),     # the expand: K = r below one step, N several column blocks
    (3, 70, 16, 3),     # few rows, long K: split into slices of K (k_splits), summed by the last slice
])
def test_gather_mm_matches_float64(dtype, M, K, N, G):
    x, w, ids, add = _case(M, K, N, G, dtype)
    for a in (None, add):
        out = gather_mm(x, w, ids, add=a)
        assert out.dtype == dtype and out.shape == (M, N)
        err = _rel(out, _reference(x, w, ids, a))
        assert err < TOL[dtype], f"add={a is not None}: rel err {err:.2e} > {TOL[dtype]:.0e}"


@kernels
def test_rows_without_an_adapter_get_add_alone_and_add_is_not_written():
    x, w, ids, add = _case(7, 37, 53, 5, torch.float32)
    before = add.clone()
    out = gather_mm(x, w, ids, add=add)
    assert torch.equal(add, before) and out.data_ptr() != add.data_ptr()  # a new tensor, as segment_mm's
    none = (ids < 0) | (ids >= w.shape[0])
    assert torch.equal(out[none], add[none])
    assert gather_mm(x, w, ids)[none].abs().max() == 0


@kernels
def test_equals_segment_mm_and_reads_w_through_its_strides():
    from automodel_lora.kernels.segment_mm import segment_mm

    x, w, ids, add = (t.to(DEV) for t in _case(11, 29, 21, 5, torch.float32, seed=3))  # segment_mm: kernels only
    want = segment_mm(x, w, ids, add=add)
    assert _rel(gather_mm(x, w, ids, add=add), want.double()) < TOL[torch.float32]
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # (G, N, K) with K-major tiles: a view, not a copy
    assert _rel(gather_mm(x, wt, ids, add=add), want.double()) < TOL[torch.float32]


def test_the_pytorch_path_matches_float64():
    """float64 takes the PyTorch path everywhere (the CPU without the interpreter: every dtype)."""
    x, w, ids, add = _case(7, 37, 53, 5, torch.float64)
    before = add.clone()
    assert _rel(gather_mm(x, w, ids, add=add), _reference(x, w, ids, add)) < 1e-12
    assert torch.equal(add, before)
    assert _rel(gather_mm(x, w, ids), _reference(x, w, ids)) < 1e-12


def test_argument_errors_name_the_problem():
    x, w, ids, add = _case(7, 37, 53, 5, torch.float32)
    with pytest.raises(ValueError, match=r"x \(7, 36\), w \(5, 53, 37\), ids \(7,\) do not chain"):
        gather_mm(x[:, :36], w, ids)
    with pytest.raises(ValueError, match=r"ids \(6,\) do not chain"):
        gather_mm(x, w, ids[:6])
    with pytest.raises(ValueError, match=r"add \(7, 52\) do not chain"):
        gather_mm(x, w, ids, add=add[:, :52])
    with pytest.raises(ValueError, match=r"expected x \(M, K\), w \(G, N, K\)"):
        gather_mm(x, w[0], ids)
    with pytest.raises(ValueError, match="ids has dtype torch.float32; pass integer ids"):
        gather_mm(x, w, ids.float())
    with pytest.raises(ValueError, match="must be floating point"):
        gather_mm(x.long(), w, ids)
    with pytest.raises(ValueError, match="w is on meta and x on cpu; move them to one device"):
        gather_mm(x, w.to("meta"), ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("N", [14336, 4096])
def test_gpu_bf16_at_a_decode_shape(N):
    """64 rows, each its own adapter of 64, hidden 4096, r = 16: the shrink x A^T and the expand xa B^T added
    into a base output of width N (an 8B model's MLP and attention widths), against fp32."""
    M, K, r, G = 64, 4096, 16, 64
    g = torch.Generator().manual_seed(7)
    x = torch.randn(M, K, generator=g).cuda().bfloat16()
    A = (torch.randn(G, r, K, generator=g) / K**0.5).cuda().bfloat16()
    B = (torch.randn(G, N, r, generator=g) / r**0.5).cuda().bfloat16()
    base = torch.randn(M, N, generator=g).cuda().bfloat16()
    ids = torch.randperm(G, generator=g).cuda()
    xa = gather_mm(x, A, ids)  # (M, r)
    y = gather_mm(xa, B, ids, add=base)  # (M, N)
    xa_ref = torch.einsum("mk,mrk->mr", x.float(), A[ids].float())
    y_ref = base.float() + torch.einsum("mr,mnr->mn", xa_ref, B[ids].float())
    assert ((xa.float() - xa_ref).norm() / xa_ref.norm()).item() < TOL[torch.bfloat16]
    assert ((y.float() - y_ref).norm() / y_ref.norm()).item() < TOL[torch.bfloat16]


@kernels
def test_a_split_k_sums_its_slices_in_order():
    """Where rows x column blocks are fewer than two programs per SM, K is split (``k_splits``: three slices for
    3 rows of 70 on the interpreter's 4 SMs), the last slice of each (row, block) adds the partials in slice
    order: the result matches float64 (the interpreter runs the programs one after another; the GPU test below
    races them)."""
    from automodel_lora.kernels.gather_mm import k_splits
    from automodel_lora.kernels.launch import sm_count

    x, w, ids, add = _case(3, 70, 16, 3, torch.float32, seed=5)
    S, kc = k_splits(3, 1, 70, 16, sm_count(x.device))
    assert S > 1 and kc % 16 == 0 and (S - 1) * kc < 70 <= S * kc
    assert ((ids >= 0) & (ids < 3)).sum() == 2  # two rows with an adapter, one without
    assert _rel(gather_mm(x, w, ids, add=add), _reference(x, w, ids, add)) < TOL[torch.float32]
    assert k_splits(64, 16, 16, 16, 132) == (1, 16)  # the expand of a decode step: enough programs, one slice
    assert k_splits(5, 1, 0, 16, 132) == (1, 16)  # no K: one slice, nothing to sum


@kernels
def test_an_empty_k_gives_add_alone_or_zero():
    x, w, ids, add = _case(5, 0, 16, 3, torch.float32)
    assert torch.equal(gather_mm(x, w, ids, add=add), add)
    assert gather_mm(x, w, ids).abs().max() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 3, 64])
def test_gpu_split_k_is_exact_and_repeats_bit_for_bit_across_streams_and_graphs(M):
    """The decode shrink at K = 4096 (sliced over K on a GPU with programs to spare): against float64, then the
    same launch 50 times, on a second stream, and captured in a CUDA graph and replayed: equal bit for bit (the
    slices race; the sum's order does not)."""
    from automodel_lora.kernels.gather_mm import _tiles, k_splits
    from automodel_lora.kernels.launch import sm_count

    K, N, G = 4096, 16, 8
    x, w, ids, add = (t.cuda() for t in _case(M + 2, K, N, G, torch.float32, seed=M))
    x, add = x[:M].contiguous(), add[:M].contiguous()
    ids = (torch.arange(M, device="cuda") * 3) % G  # every row with an adapter, some shared
    BN, BK = _tiles(N, K)
    assert k_splits(M, 1, K, BK, sm_count(x.device))[0] > 1
    first = gather_mm(x, w, ids, add=add)
    assert _rel(first, _reference(x.cpu(), w.cpu(), ids.cpu(), add.cpu()).cuda()) < TOL[torch.float32]
    assert all(torch.equal(gather_mm(x, w, ids, add=add), first) for _ in range(50))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = gather_mm(x, w, ids, add=add)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gather_mm(x, w, ids, add=add)
    for _ in range(3):
        graph.replay()
        assert torch.equal(captured, first)
    assert torch.equal(on_side, first)
