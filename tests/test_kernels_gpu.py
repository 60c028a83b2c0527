"""GPU tests of the LoRA kernels (skipped without CUDA): bf16 at real shapes, dropout,
torch.compile with inductor, int64 offsets (M * K > 2**31).

    pytest tests/test_kernels_gpu.py

bf16 tolerance, normwise against an fp32 reference on the same bf16 inputs: the output and the
[M, r] projections are rounded to bf16 (eps 7.8e-3, i.e. 3.9e-3 relative per rounding; errors of
~1e5 independent outputs average in the norm to about one rounding), so 1e-2 is ~2.5 roundings; a
wrong term or mask is off by > 5e-2 (the adapter term is ~20% of y here).
"""

from __future__ import annotations

import gc

import pytest
import torch

from automodel_lora.kernels import KernelOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_TOL = 1e-2


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm()).item()


def _inputs(M, K, N, r, dtype=torch.bfloat16, adapter_dtype=None, bias=False, dev="cuda"):
    torch.manual_seed(0)
    adt = adapter_dtype or dtype
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    W = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)
    b = torch.randn(N, device=dev).to(dtype) if bias else None
    A = (torch.randn(r, K, device=dev) / K**0.5).to(adt).requires_grad_(True)
    B = (torch.randn(N, r, device=dev) * 0.05).to(adt).requires_grad_(True)
    return x, W, b, A, B


def _check_lora_linear(x, W, b, A, B, what="", options=None):
    """lora_linear (s=2) forward and backward against the fp32 reference: y, dx, dA, dB within BF16_TOL."""
    from automodel_lora.kernels import lora_linear

    x.grad = A.grad = B.grad = None
    y = lora_linear(x, W, b, A, B, 2.0, options=options)
    g = torch.randn_like(y)
    y.backward(g)
    yr, xr, Ar, Br = _ref(x, W, b, A, B, 2.0)
    yr.backward(g.float())
    for name, got, want in (("y", y, yr), ("dx", x.grad, xr.grad), ("dA", A.grad, Ar.grad), ("dB", B.grad, Br.grad)):
        err = rel(got, want)
        assert err < BF16_TOL, f"{what}{name}: rel err {err:.2e}"


def _ref(x, W, b, A, B, s, keep=None, pos="post", p=0.0):
    xf, Wf, Af, Bf = x.detach().float(), W.float(), A.detach().float(), B.detach().float()
    xf.requires_grad_(True)
    Af.requires_grad_(True)
    Bf.requires_grad_(True)
    xd = xf * keep / (1 - p) if (keep is not None and pos == "pre") else xf
    lr = s * (xd @ Af.t()) @ Bf.t()
    if keep is not None and pos == "post":
        lr = lr * keep / (1 - p)
    y = xf @ Wf.t() + lr + (0 if b is None else b.float())
    return y, xf, Af, Bf


@pytest.mark.parametrize("base_gemm", ["triton", "triton_proj_pass", "cublas", "portable"])
@pytest.mark.parametrize("K,N,r", [(4096, 4096, 16), (4096, 14336, 64), (14336, 4096, 16), (4096, 1024, 256),
                                   (1000, 776, 8)])
def test_bf16_real_shapes(K, N, r, base_gemm, monkeypatch, kernel_options):
    """"triton" is the TMA GEMM on Hopper, which also makes xa and dyB (r <= 64; the portable kernel beyond,
    and on older GPUs); "triton_proj_pass" the same GEMM after a proj pass; "portable" the non-TMA Triton
    GEMM everywhere; "cublas" the low-rank term added through beta=1."""
    from automodel_lora.kernels import tma_desc

    M = 4095  # not a multiple of any tile: the last M tile is partial
    x, W, b, A, B = _inputs(M, K, N, r, bias=True)
    if base_gemm == "portable":
        monkeypatch.setattr(tma_desc, "TensorDescriptor", None)  # a Triton without host-side TMA descriptors
    options = kernel_options(base_gemm="cublas" if base_gemm == "cublas" else "triton",
                             fuse_proj=base_gemm != "triton_proj_pass")
    _check_lora_linear(x, W, b, A, B, options=options)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused_proj", "proj_pass"])
@pytest.mark.parametrize("K,N,r", [(4096, 4096, 16), (4096, 14336, 64)])
def test_bf16_fp32_master_adapters_tma(K, N, r, fuse, monkeypatch, kernel_options):
    """fp32 master adapters through the TMA GEMM: its rank step then scales Q in fp32 and rounds it once
    (a 16-bit Q is used as loaded and P is scaled instead); both GEMMs must take that path."""
    from automodel_lora.kernels import dispatch as D

    x, W, b, A, B = _inputs(4095, K, N, r, adapter_dtype=torch.float32, bias=True)
    options = kernel_options(base_gemm="triton", fuse_proj=fuse)
    route = "fused_proj" if fuse else "tma"
    assert D.forward_route(x, W, None, A, B, 0.0, True, options) == route
    assert D.dx_route(torch.empty(4095, N, device="cuda", dtype=x.dtype), W, A, B, 0.0, True, options) == route
    q_dtypes = []
    name = "gemm_lora_proj" if fuse else "gemm_lora"
    real = getattr(D, name)
    monkeypatch.setattr(D, name, lambda *a, **k: (q_dtypes.append(a[3].dtype), real(*a, **k))[1])
    _check_lora_linear(x, W, b, A, B, options=options)
    assert q_dtypes == [torch.float32, torch.float32], "y and dx must come from the TMA GEMM with the fp32 Q"


@pytest.mark.parametrize("pos", ["pre", "post"])
def test_bf16_dropout_fp32_adapters(pos):
    _check_dropout(pos, "cuda")


def _check_dropout(pos, dev):
    """lora_linear with dropout (p=0.3 at ``pos``) and fp32 adapters on ``dev``: the mask regenerated from the
    layer's seed keeps 1-p, and y, dx, dA, dB match the fp32 reference under that mask."""
    from automodel_lora.kernels import dropout_keep_mask, lora_linear

    M, K, N, r, p = 2048, 1024, 768, 16, 0.3
    x, W, b, A, B = _inputs(M, K, N, r, adapter_dtype=torch.float32, dev=dev)
    torch.manual_seed(5)
    y = lora_linear(x, W, b, A, B, 2.0, p, pos)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(5)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=dev)
    keep = dropout_keep_mask(seed, M, K if pos == "pre" else N, p, dev).float()
    assert abs(keep.mean().item() - (1 - p)) < 5e-3
    yr, xr, Ar, Br = _ref(x, W, b, A, B, 2.0, keep, pos, p)
    yr.backward(g.float())
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32
    for name, a, e in (("y", y, yr), ("dx", x.grad, xr.grad), ("dA", A.grad, Ar.grad), ("dB", B.grad, Br.grad)):
        err = rel(a, e)
        assert err < BF16_TOL, f"{name}: rel err {err:.2e}"


def test_torch_compile_inductor_fullgraph():
    from automodel_lora.kernels import lora_add, lora_linear

    torch._dynamo.reset()
    x, W, b, A, B = _inputs(512, 256, 384, 16, bias=True)

    def f(x):
        h = lora_linear(x, W, b, A, B, 2.0)
        return lora_add(h * 2, x, A, B[:384], 1.0)

    y_e = f(x)
    y_e.float().square().sum().backward()
    ge = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    fc = torch.compile(f, fullgraph=True)
    y_c = fc(x)
    y_c.float().square().sum().backward()
    assert rel(y_c, y_e) < 1e-3
    for a, e in zip((x.grad, A.grad, B.grad), ge, strict=True):
        assert rel(a, e) < 1e-2


def test_int64_offsets():
    """M * K > 2**31: row offsets must be int64 in every kernel."""
    from automodel_lora.kernels import lora_linear

    K, N, r = 4096, 64, 8
    M = 2**31 // K + 256
    free = torch.cuda.mem_get_info()[0]
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB free")
    x, W, b, A, B = _inputs(M, K, N, r)
    y = lora_linear(x, W, b, A, B, 2.0)
    g = torch.randn_like(y)
    y.backward(g)
    tail = slice(M - 512, M)  # rows past the int32 boundary
    xt = x.detach()[tail].float()
    y_ref = xt @ W.float().t() + 2.0 * (xt @ A.detach().float().t()) @ B.detach().float().t()
    assert rel(y[tail], y_ref) < BF16_TOL
    dx_ref = g[tail].float() @ W.float() + 2.0 * (g[tail].float() @ B.detach().float()) @ A.detach().float()
    assert rel(x.grad[tail], dx_ref) < BF16_TOL
    dB_ref = 2.0 * g.float().t() @ (x.detach().float() @ A.detach().float().t())
    assert rel(B.grad, dB_ref) < BF16_TOL


def test_repeat_launches_and_alignment():
    """The third and later launches of a kernel at one shape go through the cached compiled kernel
    (no Triton argument binding): they must give the reference result every time, also when an
    input's alignment differs from the one the kernel was compiled for (a view offset by one
    element is only 2-byte aligned, so it needs its own specialization)."""
    from automodel_lora.kernels import launch

    if launch.FAST_LAUNCH_UNAVAILABLE is not None:
        pytest.skip(f"the direct launch path is off: {launch.FAST_LAUNCH_UNAVAILABLE}")
    compiled_before = len(launch.COMPILED)
    M, K, N, r = 1000, 520, 264, 16
    x, W, b, A, B = _inputs(M, K + 1, N, r)
    W = W[:, :K].contiguous()
    A = A.detach()[:, :K].contiguous().requires_grad_(True)
    views = [x.detach()[:, :K], x.detach()[:, 1:]]  # 16-byte aligned and 2-byte aligned, same strides
    for i in range(6):
        xv = views[i % 2].clone() if i == 5 else views[i % 2]
        _check_lora_linear(xv.detach().requires_grad_(True), W, None, A, B, what=f"launch {i}: ",
                           options=KernelOptions(fast_launch=True))
    assert len(launch.COMPILED) > compiled_before, "repeat launches did not go through the cached compiled kernels"


def _on_two_streams(fn, rounds: int = 3) -> list:
    """``fn()`` ``rounds`` times on each of two streams, launched alternately so that they run at once."""
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    outs = []
    for _ in range(rounds):
        for st in streams:
            with torch.cuda.stream(st):
                outs.append(fn())
    torch.cuda.synchronize()
    return outs


def test_gemm_lora_proj_many_row_blocks_two_streams():
    """gemm_lora_proj with 391 row blocks (10 projection tiles per short program, so GEMM tiles wait for
    theirs) against fp64, repeated and on two streams at once (each with its own locks): same bits every
    time, no hang."""
    from automodel_lora.kernels.launch import sm_count
    from automodel_lora.kernels.tma_desc import tma_eligible_proj
    from automodel_lora.kernels.tma_gemm import gemm_lora_proj

    torch.manual_seed(0)
    M, K, N, R = 50001, 1024, 2048, 16
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    A = torch.randn(R, K, device="cuda") / K**0.5  # fp32 master
    B = (torch.randn(N, R, device="cuda") * 0.05).to(torch.bfloat16)
    assert tma_eligible_proj(x, W.t(), A.t(), B.t()) and M / 128 > sm_count(x.device)
    y, xa = gemm_lora_proj(x, W.t(), A.t(), B.t(), 2.0)
    xa_ref = x.double() @ A.to(torch.bfloat16).double().t()
    assert rel(xa, xa_ref) < BF16_TOL
    y_ref = x.double() @ W.double().t() + 2.0 * xa.double() @ B.double().t()
    assert rel(y, y_ref) < BF16_TOL
    for y2, xa2 in _on_two_streams(lambda: gemm_lora_proj(x, W.t(), A.t(), B.t(), 2.0)):
        assert torch.equal(y2, y) and torch.equal(xa2, xa)


@pytest.mark.parametrize("M,N", [(128 * 132, 256), (1000, 512)], ids=["tiles_multiple_of_sms", "fewer_tiles_than_sms"])
def test_gemm_lora_proj_schedule_edges(M, N):
    """The projection tiles' schedule where no program is left short (every program takes projection tiles)
    and where the grid is smaller than the SM count: against fp64, and the same bits as the GEMM given pm."""
    from automodel_lora.kernels.launch import tile_locks
    from automodel_lora.kernels.tma_gemm import gemm_lora, gemm_lora_proj

    torch.manual_seed(0)
    K, R = 512, 16
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    W = (torch.randn(N, K, device="cuda") / K**0.5).to(torch.bfloat16)
    A = (torch.randn(R, K, device="cuda") / K**0.5).to(torch.bfloat16)
    B = (torch.randn(N, R, device="cuda") * 0.05).to(torch.bfloat16)
    y, xa = gemm_lora_proj(x, W.t(), A.t(), B.t(), 2.0)
    assert rel(xa, x.double() @ A.double().t()) < BF16_TOL
    assert torch.equal(y, gemm_lora(x, W.t(), xa, B.t(), 2.0, tma=True))
    assert not tile_locks(x.device, 1).any()


def test_cuda_graph_replays_fused_layer():
    """lora_linear forward + backward at a layer shape where "auto" fuses the projections, captured in a CUDA
    graph (its kernels' locks then belong to the graph) and replayed on new inputs: the same bits as eager."""
    from automodel_lora.kernels import dispatch as D
    from automodel_lora.kernels import lora_linear

    M, K, N, r = 8192, 4096, 4096, 16
    options = KernelOptions(base_gemm="auto", fuse_proj=True)
    assert D.fuses_proj(torch.empty(M, K, device="cuda", dtype=torch.bfloat16),
                        torch.empty(N, K, device="cuda", dtype=torch.bfloat16).t(),
                        torch.empty(r, K, device="cuda", dtype=torch.bfloat16).t(),
                        torch.empty(N, r, device="cuda", dtype=torch.bfloat16).t(), options)
    x, W, b, A, B = _inputs(M, K, N, r)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    static_x = x.detach().clone().requires_grad_(True)

    def step():
        static_x.grad = A.grad = B.grad = None
        lora_linear(static_x, W, None, A, B, 2.0, options=options).backward(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles and autotunes outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph_grads = (static_x.grad, A.grad, B.grad)  # the graph's outputs (the .grad attributes move on below)
    for seed in (1, 2):
        torch.manual_seed(seed)
        static_x.data.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.cuda.synchronize()
        got = tuple(t.clone() for t in graph_grads)
        step()
        for name, a, e in zip(("dx", "dA", "dB"), got, (static_x.grad, A.grad, B.grad), strict=True):
            assert torch.equal(a, e), f"replay {seed}: {name} differs from eager"


def test_split_m_sum_deterministic_across_streams():
    """tn2 at a real shape (several split-M slices, summed inside the launch by the last slice of each
    tile): fp32 and bf16 outputs match the fp64 reference, repeat launches are bit-identical, and
    launches on two streams at once (each with its own tile locks) give the same bits."""
    from automodel_lora.kernels.grad_ab import split_rows, tn2
    from automodel_lora.kernels.launch import rank_block

    torch.manual_seed(0)
    M, DA, DB, R = 8192, 4096, 4096, 16
    pa = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(M, DA, device="cuda", dtype=torch.bfloat16)
    pb = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
    xb = torch.randn(M, DB, device="cuda", dtype=torch.bfloat16)
    assert split_rows(M, DA + DB, R, rank_block(R), xa.device)[0] > 1
    ref_a = 0.5 * pa.double().t() @ xa.double()
    ref_b = 0.5 * (pb.double().t() @ xb.double()).t()
    dA, dB = tn2(pa, xa, pb, xb, 0.5)
    assert rel(dA, ref_a) < 1e-5 and rel(dB, ref_b) < 1e-5  # fp32 accumulation and output
    h_a, h_b = tn2(pa, xa, pb, xb, 0.5, dtype_a=torch.bfloat16, dtype_b=torch.bfloat16)
    assert rel(h_a, ref_a) < BF16_TOL and rel(h_b, ref_b) < BF16_TOL
    for a, b in _on_two_streams(lambda: tn2(pa, xa, pb, xb, 0.5)):
        assert torch.equal(a, dA) and torch.equal(b, dB)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_in_one_process():
    """The same layer on cuda:0 and on cuda:1 while cuda:0 stays current, alternating: Triton launches on
    the current device, so the kernels must enter cuda:1 themselves; the launch cache, the tile locks and the
    TMA descriptors are per device.  Every launch (autotuned first, then the cached direct launches) matches
    the reference on both GPUs, and dropout's mask is regenerated on cuda:1."""
    torch.cuda.set_device(0)
    M, K, N, r = 2048, 4096, 4096, 16  # M*K*N = 2**35: the TMA GEMM under "auto" on Hopper; split-M tn2
    layers = {dev: _inputs(M, K, N, r, bias=True, dev=dev) for dev in ("cuda:0", "cuda:1")}
    for i in range(4):
        for dev, (x, W, b, A, B) in layers.items():
            _check_lora_linear(x, W, b, A, B, what=f"{dev} launch {i}: ")
    _check_dropout("pre", "cuda:1")
    assert torch.cuda.current_device() == 0


def test_nf4_base_fused_real_shape():
    """QLoRA at an 8B gate/up shape (bf16, 4096 tokens: bitsandbytes dequantizes at this size too): the
    4-bit weight dequantized (by the NF4 kernel) into the fused GEMM gives y, dx, dA, dB within BF16_TOL of
    fp32 math on the dequantized weight, and bitsandbytes' own forward is not called."""
    bnb = pytest.importorskip("bitsandbytes")

    import automodel_lora as al

    M, K, N, r = 4096, 4096, 14336, 16
    x, W, _, A, B = _inputs(M, K, N, r)
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(W.cpu(), requires_grad=False, quant_type="nf4")
    layer = layer.cuda()
    al.patch_linear_module(layer, dim=r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
    Wd = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    forward = bnb.nn.Linear4bit.forward

    def refuse(*_):
        raise AssertionError("bitsandbytes' forward ran: the 4-bit base was not fused")

    from automodel_lora.kernels import nf4

    dequantize_nf4, used = nf4.dequantize_nf4, []
    bnb.nn.Linear4bit.forward = refuse
    nf4.dequantize_nf4 = lambda *a: used.append(1) or dequantize_nf4(*a)
    try:
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
    finally:
        bnb.nn.Linear4bit.forward = forward
        nf4.dequantize_nf4 = dequantize_nf4
    assert len(used) == 2  # forward and backward: automodel_lora's NF4 kernel, not bitsandbytes'
    yr, xr, Ar, Br = _ref(x, Wd, None, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    yr.backward(g.float())
    got = (("y", y, yr), ("dx", x.grad, xr.grad), ("dA", layer.lora_A.weight.grad, Ar.grad),
           ("dB", layer.lora_B.weight.grad, Br.grad))
    for name, a, b in got:
        err = rel(a, b)
        assert err < BF16_TOL, f"{name}: rel err {err:.2e}"
    # below 1537 rows bitsandbytes may use its own 4-bit GEMM kernel: its forward runs
    calls = []
    bnb.nn.Linear4bit.forward = lambda self, x_: calls.append(x_.shape) or forward(self, x_)
    try:
        layer(x[:1536].detach())
    finally:
        bnb.nn.Linear4bit.forward = forward
    assert calls == [(1536, K)]


def _nf4_check(bnb, W, dtype, calls=1, **quant):
    """Quantize W with bitsandbytes and compare ``calls`` NF4-kernel dequantizes with bitsandbytes' (CUDA)."""
    from automodel_lora.kernels import nf4

    packed, state = bnb.functional.quantize_4bit(W.to(dtype), quant_type="nf4", **quant)
    assert nf4.nf4_supported(state, packed), quant
    expected = bnb.functional.dequantize_4bit(packed, state)
    for _ in range(calls):
        got = nf4.dequantize_nf4(packed, state, dtype)
        assert torch.equal(got, expected), (dtype, quant, (got.float() - expected.float()).abs().max().item())


@pytest.mark.parametrize("nested, storage", [(True, torch.uint8), (False, torch.bfloat16)])
def test_nf4_kernel_equals_bitsandbytes_real_shape(nested, storage):
    """The NF4 dequantize kernel gives bitsandbytes' CUDA dequantize_4bit bit for bit in bf16 and fp16 at
    an 8B shape (58.7 M values), nested statistics (fp-contraction off) and a bf16 storage dtype included:
    three calls (autotune and jit, the recorded plan, the cached launch), then another weight under the
    same launch signature (the cached launch with its own pointers)."""
    bnb = pytest.importorskip("bitsandbytes")
    W = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float16):
        quant = dict(blocksize=64, compress_statistics=nested, quant_storage=storage)
        _nf4_check(bnb, W, dtype, calls=3, **quant)
        _nf4_check(bnb, torch.randn_like(W) * 3, dtype, **quant)


def test_nf4_kernel_equals_bitsandbytes_blocksizes_and_odd_sizes():
    """Every bitsandbytes 4-bit blocksize, nested and plain statistics, and an odd number of values (the last
    byte holds one), in bf16 on the GPU."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    for shape in ((1001, 77), (512, 4096)):
        W = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            for nested in (False, True):
                _nf4_check(bnb, W, torch.bfloat16, calls=2, blocksize=blocksize, compress_statistics=nested)


@pytest.mark.parametrize("quantized", [False, True])
def test_recompute_mlp_input_saves_its_bytes_and_changes_no_bit(quantized):
    """A bf16 Llama (and its NF4 twin) with every projection adapted: loss and every gradient equal bit for
    bit with and without `recompute_mlp_input`, and the memory held from forward to backward smaller by
    down_proj's input (tokens x intermediate x 2 bytes per layer; the recompute keeps nothing else)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from automodel_lora import PeftConfig, apply_lora_to_linear_modules

    if quantized:
        pytest.importorskip("bitsandbytes")
    cfg = LlamaConfig(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=4,
                      num_hidden_layers=2, vocab_size=1024)
    tokens, proj = 2 * 512, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 512), device="cuda")
    held, grads, losses = {}, {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dtype=torch.bfloat16)
        model.load_state_dict(base.state_dict())
        if quantized:
            from tests.test_qlora import to_nf4

            to_nf4(model, compute_dtype=torch.bfloat16)
        model.cuda()
        apply_lora_to_linear_modules(model, PeftConfig(target_modules=proj, dim=16, alpha=32,
                                                       recompute_mlp_input=recompute))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        model(input_ids=ids, labels=ids).loss.backward()  # warm-up (kernels compiled, caches filled)
        model.zero_grad(set_to_none=True)
        gc.collect()  # the previous model's cycles now, not inside the measured forward
        gc.disable()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        held[recompute] = torch.cuda.memory_allocated() - before
        gc.enable()
        loss.backward()
        losses[recompute] = loss.detach()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        del model, loss
    assert torch.equal(losses[True], losses[False])
    assert grads[True].keys() == grads[False].keys()
    for name in grads[False]:
        assert torch.equal(grads[True][name], grads[False][name]), name
    h_bytes = cfg.num_hidden_layers * tokens * cfg.intermediate_size * 2
    saved = held[False] - held[True]
    assert abs(saved - h_bytes) <= 0.05 * h_bytes, (saved, h_bytes, held)


def test_in_place_expand_is_right_on_its_first_autotuned_call():
    """``expand(..., add=y, out=y)`` (DoRA's cuBLAS route): the autotuner times every config on the real
    arguments, which must not add the term once per timed run (the output is restored between runs)."""
    from automodel_lora.kernels.expand import expand

    torch.manual_seed(0)
    M, N, R = 3001, 1536, 16  # a shape no other test autotunes
    pm = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(R, N, device="cuda", dtype=torch.bfloat16) * 0.1
    y = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    f = torch.rand(N, device="cuda", dtype=torch.float32) + 0.5
    want = (y.float() + 2.0 * pm.float() @ q.float()) * f
    out = expand(pm, q, 2.0, add=y, col_scale=f, out=y)
    assert out.data_ptr() == y.data_ptr()
    assert rel(out, want) < BF16_TOL
