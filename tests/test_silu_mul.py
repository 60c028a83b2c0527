"""`silu_mul`: ``act(g) * u`` keeping only g and u for backward, alone and inside a swapped gated MLP.

Runs in three modes:
    pytest tests/test_silu_mul.py                        # CPU, PyTorch math (bit for bit autograd's)
    TRITON_INTERPRET=1 pytest tests/test_silu_mul.py     # the Triton kernels in the interpreter (fp32, fp16)
    pytest tests/test_silu_mul.py  (on a CUDA machine)   # + the kernels in bf16 at a real shape
Tests named *_interp run only under the interpreter, *_cuda only with a GPU.

Tolerances, elementwise ``|a - e| <= rtol |e| + atol max|e|`` (``TOL``), for the kernels against
``act(g) * u`` run by autograd in the same dtype and against float64: the kernels round each result once
from fp32, autograd's ops round act(g) (and dh * u) before the last product, so the two are up to
~1.5 units of the format's rounding apart (eps: bf16 7.8e-3, fp16 9.8e-4): rtol = 2 eps. act' crosses
zero, where dg's relative error has no bound: atol = 1 eps of the largest |dg|. fp32: the two ``exp``
implementations differ by a few ulps (measured ~2e-7 relative, 5e-5 for dg near act''s zero): rtol 1e-5,
atol 1e-6. A wrong term (a missing factor, act(g) for act'(g)) is off by > 1e-1.
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from automodel_lora import PeftConfig, apply_lora_to_linear_modules
from automodel_lora import recompute as rc
from automodel_lora.kernels import HAS_TRITON
from automodel_lora.kernels import silu_mul as SM
from automodel_lora.kernels.silu_mul import silu_mul

from .conftest import tiny_llama

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNELS_ON_CPU = INTERPRET and HAS_TRITON
interp_only = pytest.mark.skipif(not KERNELS_ON_CPU, reason="needs TRITON_INTERPRET=1 and triton")
cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU and triton")

TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}
ACTS = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    """``|a - e| <= rtol |e| + atol max|e|`` with ``TOL[dtype]``; reports how many elements differ and where."""
    rtol, atol = TOL[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    bad = (a - e).abs() > rtol * e.abs() + atol * e.abs().max()
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements beyond rtol={rtol}, atol={atol}*max|ref|;"
                             f" first at {idx}: {a[idx].item():.6g} vs {e[idx].item():.6g}")


def _inputs(shape, dtype, device="cpu"):
    g = torch.randn(shape, dtype=dtype, device=device).mul_(2).requires_grad_(True)  # spans act''s zero and tails
    u = torch.randn(shape, dtype=dtype, device=device).requires_grad_(True)
    dh = torch.randn(shape, dtype=dtype, device=device)
    return g, u, dh


def _autograd(g, u, dh, activation, dtype=None):
    """(h, dg, du) of ``act(g) * u`` run by autograd, in ``dtype`` (default g's)."""
    g = g.detach().to(dtype or g.dtype).requires_grad_(True)
    u = u.detach().to(g.dtype).requires_grad_(True)
    h = ACTS[activation](g) * u
    h.backward(dh.to(g.dtype))
    return h.detach(), g.grad, u.grad


def _fused(g, u, dh, activation, use_triton=True):
    g, u = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
    h = silu_mul(g, u, activation=activation, use_triton=use_triton)
    h.backward(dh)
    return h.detach(), g.grad, u.grad


def _compare(g, u, dh, activation, dtype):
    got = _fused(g, u, dh, activation)
    for ref in (_autograd(g, u, dh, activation), _autograd(g, u, dh, activation, torch.float64)):
        for a, e, what in zip(got, ref, ("h", "dg", "du"), strict=True):
            check(a, e, dtype, f"{activation} {dtype} {what} vs autograd in {ref[0].dtype}")


# ------------------------------------------------------------------------------------------
# the op
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 37), (5, 129), (2, 3, 64)])
def test_matches_autograd(shape, dtype, activation):
    if KERNELS_ON_CPU and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 loads are not reliable; bf16 kernels are tested on the GPU")
    g, u, dh = _inputs(shape, dtype)
    _compare(g, u, dh, activation, dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pytorch_path_is_autograd_bit_for_bit(dtype, activation):
    g, u, dh = _inputs((5, 129), dtype)
    for a, e in zip(_fused(g, u, dh, activation, use_triton=False), _autograd(g, u, dh, activation), strict=True):
        assert torch.equal(a, e)


def test_non_contiguous_inputs_are_copied():
    base_g = torch.randn(37, 6, requires_grad=True)
    base_u = torch.randn(6, 74, requires_grad=True)
    g, u = base_g.t(), base_u[:, ::2]  # (6, 37): transposed, every other column
    dh = torch.randn(37, 6).t()  # a non-contiguous upstream gradient
    assert not (g.is_contiguous() or u.is_contiguous() or dh.is_contiguous())
    h = silu_mul(g, u)
    h.backward(dh)
    want = _autograd(g, u, dh, "silu")
    check(h, want[0], torch.float32, "h")
    check(base_g.grad.t(), want[1], torch.float32, "dg through the copy")
    check(base_u.grad[:, ::2], want[2], torch.float32, "du through the copy")
    assert not base_u.grad[:, 1::2].any()


def _saved(fn, *args):
    """Storages (data_ptr -> nbytes) of every tensor autograd saves while ``fn(*args)`` runs, and its output."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return saved, out


@pytest.mark.parametrize("grads", ["both", "g", "u"])
def test_saves_g_and_u_only(grads):
    """Autograd's act(g) * u saves g, act(g) and u; silu_mul saves g and u (and u only where dg is needed)."""
    g = torch.randn(7, 33, requires_grad=grads in ("both", "g"))
    u = torch.randn(7, 33, requires_grad=grads in ("both", "u"))
    saved, h = _saved(silu_mul, g, u)
    want = {g.data_ptr()} | ({u.data_ptr()} if g.requires_grad else set())
    assert set(saved) == want
    plain, _ = _saved(lambda a, b: F.silu(a) * b, g, u)
    assert len(plain) == {"both": 3, "g": 2, "u": 1}[grads]  # g + act(g) + u / g + u / act(g)
    h.sum().backward()
    want = _autograd(g, u, torch.ones_like(h), "silu")
    for t, w in ((g, want[1]), (u, want[2])):
        if t.requires_grad:
            check(t.grad, w, torch.float32, "grad")


def test_empty():
    for shape in [(0, 16), (2, 0, 8)]:  # no element: no launch
        g, u, dh = _inputs(shape, torch.float32)
        h, dg, du = _fused(g, u, dh, "silu")
        assert h.shape == dg.shape == du.shape == shape


def test_validation_errors():
    g = torch.randn(3, 8)
    with pytest.raises(ValueError, match="activation must be one of .*'gelu'"):
        silu_mul(g, g, activation="gelu")
    with pytest.raises(ValueError, match=r"one shape, dtype and device.*\(3, 8\).*\(3, 4\)"):
        silu_mul(g, g[:, :4])
    with pytest.raises(ValueError, match="one shape, dtype and device.*float16"):
        silu_mul(g, g.half())
    with pytest.raises(ValueError, match="fp32, fp16 or bf16, got torch.float64"):
        silu_mul(g.double(), g.double())


def test_torch_compile_fullgraph_matches_autograd():
    g, u, dh = _inputs((4, 40), torch.float32)
    compiled = torch.compile(lambda a, b: silu_mul(a, b), backend="aot_eager", fullgraph=True)
    gc_, uc = g.detach().requires_grad_(True), u.detach().requires_grad_(True)
    h = compiled(gc_, uc)
    h.backward(dh)
    for a, e in zip((h, gc_.grad, uc.grad), _autograd(g, u, dh, "silu"), strict=True):
        torch.testing.assert_close(a, e)


def test_torch_func_grad_is_the_plain_product():
    from torch.func import grad

    g, u, _ = _inputs((4, 40), torch.float32)
    got = grad(lambda a, b: silu_mul(a, b).sum(), argnums=(0, 1))(g.detach(), u.detach())
    want = _autograd(g, u, torch.ones(4, 40), "silu")
    check(got[0], want[1], torch.float32, "dg")  # torch.func runs its own decompositions: not bit for bit
    check(got[1], want[2], torch.float32, "du")


@interp_only
def test_kernels_run_under_interpreter_interp(monkeypatch):
    calls = []
    for name in ("act_mul_forward", "act_mul_backward"):
        real = getattr(SM, name)
        monkeypatch.setattr(SM, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    g, u, dh = _inputs((3, 37), torch.float32)
    _fused(g, u, dh, "silu")
    assert calls == ["act_mul_forward", "act_mul_backward"]
    _fused(g, u, dh, "silu", use_triton=False)
    assert len(calls) == 2


@cuda_only
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_bf16_real_shape_cuda(activation):
    g, u, dh = _inputs((4096, 8192), torch.bfloat16, "cuda")
    _compare(g, u, dh, activation, torch.bfloat16)


def test_pytorch_path_without_triton():
    """With triton unimportable, silu_mul and a swapped MLP run the PyTorch math."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from automodel_lora import PeftConfig, apply_lora_to_linear_modules\n"
        "from automodel_lora.kernels.silu_mul import silu_mul\n"
        "from automodel_lora.recompute import GatedMLPRecompute\n"
        "from tests.conftest import tiny_llama\n"
        "g = torch.randn(3, 8, requires_grad=True); u = torch.randn(3, 8, requires_grad=True)\n"
        "silu_mul(g, u).sum().backward()\n"
        "assert g.grad.shape == u.grad.shape == (3, 8)\n"
        "model = tiny_llama().train()\n"
        "apply_lora_to_linear_modules(model, PeftConfig(target_modules=['down_proj']))\n"
        "assert isinstance(model.model.layers[0].mlp, GatedMLPRecompute)\n"
        "ids = torch.randint(0, 128, (1, 5)); model(input_ids=ids, labels=ids).loss.backward()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# inside a swapped gated MLP
# ------------------------------------------------------------------------------------------
class _UnfusedSiLU(nn.SiLU):
    """SiLU under another class: the swapped MLP computes it as before, ``act_fn(g) * u``."""


def _adapted(recompute=True, use_triton=True, dtype=torch.float32, **config):
    model = tiny_llama(**config).train().to(dtype)
    apply_lora_to_linear_modules(model, PeftConfig(target_modules=ALL_PROJ, dim=4, alpha=8, use_triton=use_triton,
                                                   recompute_mlp_input=recompute))
    torch.manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.model.embed_tokens.weight.requires_grad_(True)  # backward through every layer
    return model


class _Made(TorchDispatchMode):
    """Weak references to the storage of every tensor an op makes inside it."""

    def __init__(self):
        super().__init__()
        self.storages = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.storages += [weakref.ref(t.untyped_storage()) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _kept_from_forward(mlp, x) -> list[int]:
    """Bytes of each storage made in ``mlp``'s forward that is still alive after it, the output aside (sorted):
    what autograd keeps from forward to backward, however it keeps it. (Views of the parameters or of x are op
    outputs too, on storages the forward did not make: left out.)"""
    made = _Made()
    with made:
        out = mlp(x)
    gc.collect()
    old = {t.untyped_storage().data_ptr() for t in (x, out, *mlp.parameters())}
    alive = {s.data_ptr(): s.nbytes() for ref in made.storages if (s := ref()) is not None and s.data_ptr() not in old}
    out.sum().backward()  # the graph still runs
    assert mlp.down_proj.lora_A.weight.grad is not None
    return sorted(alive.values())


def _saved_by(mlp, x) -> list[int]:
    """Bytes of each distinct storage autograd saves in one forward of ``mlp``, parameters aside (sorted)."""
    params = {p.untyped_storage().data_ptr() for p in mlp.parameters()}
    saved, out = _saved(mlp, x)
    out.sum().backward()
    return sorted(n for ptr, n in saved.items() if ptr not in params)


@pytest.mark.parametrize("use_triton", [True, False])
def test_swapped_mlp_keeps_g_and_u_only(use_triton):
    """Llama MLP, x (2, 9, 32), intermediate 64: of the (18, 64) tensors, the swapped MLP keeps g and u where its
    previous product kept act(g) too, and the unswapped MLP h as well."""
    x = torch.randn(2, 9, 32, requires_grad=True)
    big = 18 * 64 * 4  # one (tokens, intermediate) fp32 tensor
    swapped = _adapted(True, use_triton).model.layers[0].mlp
    before = copy.deepcopy(swapped)
    before.act_fn = _UnfusedSiLU()
    unswapped = _adapted(False, use_triton).model.layers[0].mlp
    kept = {name: _kept_from_forward(mlp, x) for name, mlp in
            (("now", swapped), ("before", before), ("unswapped", unswapped))}
    assert [n for n in kept["now"] if n == big] == [big] * 2  # g, u
    assert [n for n in kept["before"] if n == big] == [big] * 3  # g, act(g), u
    assert [n for n in kept["unswapped"] if n == big] == [big] * 4  # g, act(g), u, h
    assert max(n for n in kept["now"] if n != big) < big  # the rest: the [tokens, r] projections
    assert sum(kept["before"]) - sum(kept["now"]) == big


@pytest.mark.parametrize("use_triton", [True, False])
def test_saved_tensors_drop_by_one_intermediate_tensor(use_triton):
    """Counted by a saved-tensors hook (under which the recipe steps aside, so h is saved as itself): the fused
    product saves g and u where ``act_fn(g) * u`` saves g, act(g) and u."""
    x = torch.randn(2, 9, 32, requires_grad=True)
    big = 18 * 64 * 4
    swapped = _adapted(True, use_triton).model.layers[0].mlp
    before = copy.deepcopy(swapped)
    before.act_fn = _UnfusedSiLU()
    now, then = _saved_by(swapped, x), _saved_by(before, x)
    assert now.count(big) == 3 and then.count(big) == 4  # g, u, h / g, act(g), u, h
    assert sum(then) - sum(now) == big


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden_act,activation", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", None)])
def test_model_loss_and_grads_equal_the_unswapped_model(monkeypatch, use_triton, dtype, hidden_act, activation):
    """A tiny LlamaForCausalLM: loss and every gradient as without the swap, bit for bit on the PyTorch math,
    within ``TOL`` where the kernels run. SiLU and the tanh GELU take silu_mul; the erf GELU keeps act_fn(g) * u."""
    kernels = use_triton and KERNELS_ON_CPU
    if kernels and dtype == torch.bfloat16:
        pytest.skip("the interpreter's bf16 loads are not reliable; bf16 kernels are tested on the GPU")
    calls = []
    real = rc.silu_mul
    monkeypatch.setattr(rc, "silu_mul", lambda g, u, **kw: calls.append(kw["activation"]) or real(g, u, **kw))
    ids = torch.randint(0, 128, (2, 9))
    grads = []
    for recompute in (False, True):
        model = _adapted(recompute, use_triton, dtype, hidden_act=hidden_act)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({"loss": loss.detach(), **{n: p.grad for n, p in model.named_parameters() if p.grad is not None}})
    assert set(calls) == ({activation} if activation else set())
    assert len(calls) == (4 if activation else 0)  # 2 layers: forward, and the recipe's h in backward
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[0].items():
        if kernels:
            torch.testing.assert_close(grads[1][name], want, rtol=TOL[dtype][0], atol=TOL[dtype][1], msg=name)
        else:
            assert torch.equal(grads[1][name], want), name


def test_which_activations_fuse():
    from transformers.activations import ACT2FN, GELUTanh, NewGELUActivation

    assert rc.fused_activation(nn.SiLU()) == "silu"
    assert rc.fused_activation(ACT2FN["silu"]) == rc.fused_activation(ACT2FN["swish"]) == "silu"
    assert rc.fused_activation(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert rc.fused_activation(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert rc.fused_activation(nn.GELU()) is None  # erf GELU
    assert rc.fused_activation(GELUTanh(use_gelu_tanh_python=True)) is None  # another formula, other bits
    assert rc.fused_activation(NewGELUActivation()) is None
    assert rc.fused_activation(_UnfusedSiLU()) is None  # a subclass may have its own forward
    replaced = nn.SiLU()
    replaced.forward = torch.relu
    assert rc.fused_activation(replaced) is None
    hooked = nn.SiLU()
    hooked.register_forward_hook(lambda module, args, out: None)  # expects act_fn to be called
    assert rc.fused_activation(hooked) is None


def test_no_grad_and_frozen_inputs_keep_the_plain_product(monkeypatch):
    calls = []
    monkeypatch.setattr(rc, "silu_mul", lambda *a, **kw: calls.append(1))
    mlp = _adapted(True).model.layers[0].mlp
    with torch.no_grad():
        mlp(torch.randn(9, 32))
    for proj in (mlp.gate_proj, mlp.up_proj):
        proj.requires_grad_(False)
    mlp(torch.randn(9, 32)).sum().backward()  # g, u need no grad: only down_proj's adapter trains
    assert calls == []


@cuda_only
def test_mlp_keeps_one_tensor_less_cuda():
    """A Llama-3.2-1B MLP (2048 -> 8192), bf16, 4096 tokens, adapters r=16: what one forward leaves allocated
    for backward is one (4096, 8192) bf16 tensor (64 MiB) less than with the previous product."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=2048, intermediate_size=8192)).to("cuda", torch.bfloat16)
    mlp.requires_grad_(False)
    apply_lora_to_linear_modules(mlp, PeftConfig(target_modules=["gate_proj", "up_proj", "down_proj"], dim=16,
                                                 alpha=32))
    assert isinstance(mlp, rc.GatedMLPRecompute)
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def kept(act) -> int:
        mlp.act_fn = act
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        out = mlp(x)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - start - out.numel() * out.element_size()
        out.float().square().sum().backward()
        return held

    for act in (nn.SiLU(), _UnfusedSiLU()):  # autotuning and the launch cache first
        kept(act)
    assert kept(_UnfusedSiLU()) - kept(nn.SiLU()) == 4096 * 8192 * 2
