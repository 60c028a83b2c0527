"""QLoRA: bitsandbytes NF4 bases (which run on the CPU since bitsandbytes 0.50) patched in place."""

import copy
import os

import pytest
import torch
from torch import nn

import automodel_lora as al
import automodel_lora.kernels.lora  # noqa: F401  (al.kernels.lora below: the package imports submodules lazily)

from .conftest import assert_close, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def _dequantize_4bit_reference(packed: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """bitsandbytes' generic 4-bit dequantize (its ``backends/default`` math) in plain torch: the code
    value of each nibble (high nibble first) times its block's absmax, in fp32, rounded once to ``dtype``
    (default: the quantized weight's)."""
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnb.functional.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
    q8 = (packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)).reshape(-1)
    n = quant_state.shape.numel()
    nibbles = torch.stack((q8 >> 4, q8 & 15), dim=1).reshape(-1)[:n].long()
    scale = absmax.float().repeat_interleave(quant_state.blocksize)[:n]
    out = (quant_state.code.to(packed.device)[nibbles] * scale).reshape(quant_state.shape).to(dtype or quant_state.dtype)
    return out.t() if packed.shape[0] == 1 else out


def _cpu_dequantize_is_wrong() -> bool:
    """bitsandbytes 0.50's native CPU kernels (dequantize_4bit, and gemm_4bit behind Linear4bit's forward)
    decode blocks that straddle two rows wrongly on AVX512 CPUs (seen on an AMD EPYC with avx512f/bw/bf16:
    max error 6.1 at (64, 96), blocksize 64; right when in_features is a multiple of the blocksize, and on
    other CPUs seen)."""
    torch.manual_seed(0)
    packed, state = bnb.functional.quantize_4bit(torch.randn(8, 96), blocksize=64, quant_type="nf4")
    return not torch.equal(bnb.functional.dequantize_4bit(packed, state), _dequantize_4bit_reference(packed, state))


CPU_DEQUANTIZE_IS_WRONG = _cpu_dequantize_is_wrong()


@pytest.fixture(autouse=True)
def _bitsandbytes_reference_dequantize(monkeypatch):
    """Where bitsandbytes' CPU kernels are wrong (above), the references of these tests (bitsandbytes'
    dequantize_4bit and Linear4bit's product) use its generic math instead: the dequantized weight, then
    F.linear, as its backward does; elsewhere they are bitsandbytes' own."""
    if not CPU_DEQUANTIZE_IS_WRONG:
        return
    real = bnb.functional.dequantize_4bit

    def dequantize_4bit(A, quant_state=None, *args, **kwargs):
        if A.device.type == "cpu" and quant_state is not None and not args and not kwargs:
            return _dequantize_4bit_reference(A, quant_state)
        return real(A, quant_state, *args, **kwargs)

    def matmul_4bit(A, B, quant_state, out=None, bias=None):  # Linear4bit's product: y = A W^T + b
        if A.device.type != "cpu" or out is not None:
            return real_matmul(A, B, quant_state, out=out, bias=bias)
        # gemm_4bit dequantizes straight into A's dtype (no rounding through the weight's source dtype)
        return torch.nn.functional.linear(A, _dequantize_4bit_reference(B.view(-1, 1), quant_state, A.dtype), bias)

    real_matmul = bnb.matmul_4bit
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", dequantize_4bit)
    monkeypatch.setattr(bnb, "matmul_4bit", matmul_4bit)


def to_nf4(model: nn.Module, compute_dtype=torch.float32, skip=("lm_head",)) -> nn.Module:
    """Replace every nn.Linear (but `skip`) by an NF4 `Linear4bit` holding the same weights."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                q = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    quant_type="nf4",
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(module, child_name, q.to("cpu"))
    return model


def base_bytes(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("use_triton", [False, True])
def test_qlora_trains_on_nf4_base_and_leaves_it_untouched(use_triton):
    model = to_nf4(tiny_llama())
    before = base_bytes(model)
    weights_before = {n: m.weight for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    n = al.apply_lora_to_linear_modules(
        model,
        al.PeftConfig(
            target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
            dim=8,
            alpha=16,
            lora_dtype="float32",
            use_triton=use_triton,
        ),
    )
    assert n == 7
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and isinstance(q_proj, al.LinearLoRA)
    assert all(m.weight is weights_before[name] for name, m in model.named_modules() if name in weights_before)
    assert set(base_bytes(model)) == set(before)  # quant-state keys kept, nothing renamed
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = (torch.arange(16) * 7 % 128).repeat(4, 1)
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    after = base_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_default_adapter_dtype_for_4bit_base_is_its_compute_dtype():
    layer = to_nf4(nn.Sequential(nn.Linear(64, 32)), compute_dtype=torch.bfloat16)[0]
    al.patch_linear_module(layer)
    assert layer.lora_A.weight.dtype == torch.bfloat16


def test_qlora_layer_matches_dequantized_reference():
    layer = to_nf4(nn.Sequential(nn.Linear(64, 48)))[0]
    al.patch_linear_module(layer, dim=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
    x = torch.randn(3, 5, 64)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # (48, 64)
    expected = x @ dense.T + layer.bias + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    assert_close(layer(x), expected)


def test_merge_into_4bit_base_is_refused_with_the_reason():
    model = to_nf4(tiny_llama())
    al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantized"):
        al.merge_lora(model)
    assert not any(m.lora_merged for _, m in al.lora_modules(model))


def test_match_all_linear_takes_4bit_layers():
    model = to_nf4(tiny_llama())
    assert al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True)) == 14


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="bf16 loads are wrong in the Triton CPU interpreter")
def test_nf4_layer_under_bf16_autocast_with_fp32_activations():
    """bitsandbytes returns fp32 for fp32 inputs even under bf16 autocast, while the adapter runs in
    bf16: forward and backward must work and match the PyTorch path (which casts the same way)."""
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    outs = {}
    for use_triton in (False, True):
        layer = to_nf4(nn.Sequential(nn.Linear(64, 48)), compute_dtype=torch.bfloat16)[0]
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        al.patch_linear_module(layer, dim=8, alpha=16, use_triton=use_triton)
        with torch.no_grad():
            for w, lim in ((layer.lora_A.weight, 0.2), (layer.lora_B.weight, 0.1)):
                w.copy_(torch.linspace(-lim, lim, w.numel()).view_as(w))
        x = torch.linspace(-1, 1, 5 * 64).view(5, 64).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        outs[use_triton] = (y.float(), x.grad, layer.lora_A.weight.grad.float(), layer.lora_B.weight.grad.float())
    for name, a, b in zip(("y", "dx", "dA", "dB"), outs[True], outs[False], strict=True):
        assert_close(a, b, torch.bfloat16, name)


def _nf4_pair(K, N, dtype, dim=8, dropout=0.0, pos="post", weight_dtype=None):
    """Two Triton-patched NF4 layers computing in ``dtype``, holding the same 4-bit weight (quantized from
    ``weight_dtype``, default ``dtype``), bias and adapter."""
    torch.manual_seed(0)
    dense = nn.Linear(K, N).to(dtype)
    layers = []
    for _ in range(2):
        layer = to_nf4(nn.Sequential(nn.Linear(K, N)), compute_dtype=dtype)[0]
        w = dense.weight.data.to(weight_dtype or dtype)
        layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4").to("cpu")
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
        al.patch_linear_module(layer, dim=dim, alpha=2 * dim, dropout=dropout, dropout_position=pos,
                               lora_dtype="float32")
        with torch.no_grad():
            for w, lim in ((layer.lora_A.weight, 0.3), (layer.lora_B.weight, 0.2)):
                w.copy_(torch.linspace(-lim, lim, w.numel()).view_as(w).cos() * lim)
        layers.append(layer.train())
    return layers


def _step(layer, x, g, seed=1):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the dropout seed the layer draws
    y = layer(x)
    y.backward(g)
    return y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


DTYPES_4BIT = [torch.float32] + ([] if os.environ.get("TRITON_INTERPRET") == "1" else [torch.bfloat16])


@pytest.mark.parametrize("dtype, weight_dtype", [(d, d) for d in DTYPES_4BIT] + [(torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("pos, p", [("post", 0.0), ("pre", 0.25), ("post", 0.25)])
def test_4bit_base_runs_through_the_fused_gemm(monkeypatch, dtype, weight_dtype, pos, p):
    """A Triton layer on an NF4 base dequantizes the weight into the fused GEMM (bitsandbytes' forward is
    not called), twice a step (forward, backward) and never saved, and gives what bitsandbytes'
    forward + lora_add give: y, dx, dA, dB, dropout included (same seed, same mask). A weight quantized
    from bf16 and computed in fp32 is dequantized straight into fp32, as bitsandbytes does (no bf16
    rounding on the way)."""
    K, N = 96, 40
    fused, reference = _nf4_pair(K, N, dtype, dropout=p, pos=pos, weight_dtype=weight_dtype)
    x = torch.randn(3, 7, K).to(dtype)
    g = torch.randn(3, 7, N).to(dtype)

    expected = _step_with(monkeypatch, reference, x, g, fuse=False)
    calls = _count_dequantize_calls(monkeypatch)

    def refuse(*_):
        raise AssertionError("bitsandbytes' forward ran: the 4-bit base was not fused")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", refuse)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        got = _step(fused, x, g)
    assert calls == [DEQUANTIZER] * 2, calls
    assert (N, K) not in saved, saved
    # bitsandbytes' own backward dequantizes through the weight's source dtype (MatMul4Bit: dequantize_4bit
    # then .to(dy.dtype)); the fused path dequantizes dx's weight straight into the compute dtype too
    tolerance = {"dx": weight_dtype}
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, expected, strict=True):
        assert_close(a.float(), b.float(), tolerance.get(name, dtype), name)


def _step_with(monkeypatch, layer, x, g, fuse):
    with monkeypatch.context() as m:
        if not fuse:
            m.setattr(al.lora, "dequantizer_4bit", lambda *_: None)
        return _step(layer, x, g)


KERNELS_ON_CPU = al.kernels.backend.use_kernels_for(torch.empty(0))  # the Triton interpreter
# who dequantizes a 4-bit weight for the fused GEMM: our NF4 kernel where the kernels run, else bitsandbytes
DEQUANTIZER = "triton" if KERNELS_ON_CPU else "bitsandbytes"


def _count_dequantize_calls(monkeypatch) -> list:
    """A list that gets one entry per dequantize from now on (this test only), naming who dequantized:
    "bitsandbytes" (its dequantize_4bit) or "triton" (automodel_lora's NF4 kernel)."""
    calls = []
    real_bnb = bnb.functional.dequantize_4bit
    monkeypatch.setattr(bnb.functional, "dequantize_4bit",
                        lambda *a, **k: calls.append("bitsandbytes") or real_bnb(*a, **k))
    if al.kernels.HAS_TRITON:
        from automodel_lora.kernels import nf4

        real_nf4 = nf4.dequantize_nf4
        monkeypatch.setattr(nf4, "dequantize_nf4", lambda *a, **k: calls.append("triton") or real_nf4(*a, **k))
    return calls


def test_4bit_base_without_input_grad_dequantizes_once(monkeypatch):
    """When x needs no gradient, backward needs no dense weight: one dequantize per step."""
    fused, _ = _nf4_pair(64, 48, torch.float32)
    calls = _count_dequantize_calls(monkeypatch)
    fused(torch.randn(5, 64)).square().sum().backward()
    assert calls == [DEQUANTIZER] and fused.lora_A.weight.grad is not None


def test_4bit_base_keeps_its_own_forward_where_it_cannot_fuse():
    """A compute dtype other than x's (bitsandbytes casts x and returns x's dtype) and a subclass with
    its own forward keep bitsandbytes' forward: the dequantizer declines them."""
    layer = to_nf4(nn.Sequential(nn.Linear(64, 48)), compute_dtype=torch.bfloat16)[0]
    x = torch.randn(5, 64)
    assert al.quant.dequantizer_4bit(layer, bnb.nn.Linear4bit, x) is None  # x fp32, compute bf16
    assert al.quant.dequantizer_4bit(layer, bnb.nn.Linear4bit, x.bfloat16()) is not None

    class Custom(bnb.nn.Linear4bit):
        def forward(self, x):
            return super().forward(x) * 2

    assert al.quant.dequantizer_4bit(layer, Custom, x.bfloat16()) is None
    dense = nn.Linear(64, 48)
    assert al.quant.dequantizer_4bit(dense, nn.Linear, x) is None


def test_lora_linear_dequant_refuses_a_wrong_dequantized_weight():
    from automodel_lora.kernels import lora_linear_dequant

    x = torch.randn(4, 16)
    A, B = torch.randn(2, 16), torch.randn(8, 2)
    with pytest.raises(ValueError, match=r"\(8, 16\) base weight in torch.float32"):
        lora_linear_dequant(x, lambda: torch.randn(8, 16, dtype=torch.float64), None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"\(8, 16\) base weight"):
        lora_linear_dequant(x, lambda: torch.randn(16, 8), None, A, B, 1.0)
    with pytest.raises(TypeError, match="dequantize must be a callable"):
        lora_linear_dequant(x, torch.randn(8, 16), None, A, B, 1.0)


@pytest.mark.skipif(not KERNELS_ON_CPU, reason="the NF4 kernel runs on the CPU only under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16: the interpreter truncates its casts
@pytest.mark.parametrize("shape, blocksize, nested, storage", [
    ((7, 33), 64, True, torch.uint8),  # odd element count: the last byte holds one value
    ((33, 100), 32, False, torch.uint8),
    ((64, 96), 256, True, torch.bfloat16),  # FSDP-style storage dtype
    ((40, 96), 128, False, torch.float32),
])
def test_nf4_kernel_matches_bitsandbytes(dtype, shape, blocksize, nested, storage):
    """automodel_lora's NF4 dequantize kernel gives bitsandbytes' dequantize_4bit bit for bit: the same
    fp32 products (nested statistics included) rounded once to the output dtype."""
    from automodel_lora.kernels import nf4

    torch.manual_seed(0)
    w = torch.randn(shape) * 3
    packed, state = bnb.functional.quantize_4bit(w.to(dtype), blocksize=blocksize, compress_statistics=nested,
                                                 quant_type="nf4", quant_storage=storage)
    assert nf4.nf4_supported(state, packed)
    expected = bnb.functional.dequantize_4bit(packed, state)
    got = nf4.dequantize_nf4(packed, state, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()


def test_nf4_kernel_declines_what_it_does_not_cover():
    """FP4 weights, and packed bytes not in bitsandbytes' (ceil(n/2), 1) column, stay with bitsandbytes."""
    from automodel_lora.kernels import nf4

    w = torch.randn(16, 64)
    packed, state = bnb.functional.quantize_4bit(w, quant_type="fp4")
    assert not nf4.nf4_supported(state, packed)
    packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
    assert nf4.nf4_supported(state, packed)
    assert not nf4.nf4_supported(state, packed.view(1, -1))
    assert not nf4.nf4_supported(state, packed[:-1])  # fewer bytes than the shape's values need
    on_meta = copy.copy(state)
    on_meta.code = state.code.to("meta")  # statistics not on the weight's device
    assert not nf4.nf4_supported(on_meta, packed)
    fp16_code = copy.copy(state)
    fp16_code.code = state.code.half()  # the kernel (and its launch signature) read an fp32 table
    assert not nf4.nf4_supported(fp16_code, packed)
    short = copy.copy(state)
    short.absmax = state.absmax[:-1]  # fewer statistics than the shape's blocks
    assert not nf4.nf4_supported(short, packed)
    with pytest.raises(ValueError, match="torch.float64"):
        nf4.dequantize_nf4(packed, state, torch.float64)


@pytest.mark.parametrize("nested", [False, True])
def test_4bit_backward_uses_the_quant_state_its_forward_saw(nested):
    """Moving the layer's quant state between forward and backward (QuantState.to reassigns its tensors, the
    nested state's too, in place) does not reach the backward: it dequantizes what the forward did."""
    torch.manual_seed(0)
    dense = torch.randn(48, 64)
    grads = []
    for move in (False, True):
        layer = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                  compress_statistics=nested)
        layer.weight = bnb.nn.Params4bit(dense.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=nested)
        layer = layer.to("cpu")
        al.patch_linear_module(layer, dim=4, alpha=8)
        x = torch.linspace(-1, 1, 5 * 64).view(5, 64).requires_grad_(True)
        y = layer(x)
        if move:
            layer.weight.quant_state.to("meta")
        y.square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("use_triton", [False, True])
def test_dora_on_a_4bit_base_uses_the_dequantized_weight(use_triton):
    layer = to_nf4(nn.Sequential(nn.Linear(64, 48)))[0]
    al.patch_linear_module(layer, dim=4, alpha=8, use_dora=True, use_triton=use_triton)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # (48, 64)
    assert_close(layer.lora_magnitude_vector.float(), dense.norm(dim=1), what="magnitude at init = ||W||_row")
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.1)
        layer.lora_magnitude_vector.mul_(1.1)
    x = torch.randn(3, 5, 64)
    A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    factor = m / (dense + 2.0 * B @ A).norm(dim=1)
    expected = factor * (x @ dense.T + 2.0 * (x @ A.T) @ B.T) + layer.bias
    assert_close(layer(x), expected)
