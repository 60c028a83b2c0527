"""KernelOptions: the settings object, its routing per call, the fused projection's residency rule and the
launch layer's Triton-version fallback.

    pytest tests/test_kernel_options.py                       # the pure rules, the CPU reference path
    TRITON_INTERPRET=1 pytest tests/test_kernel_options.py    # plus the routing of the Triton kernels

Results are compared against a float64 reference with the fp32 tolerances of test_kernels.py (2e-6
normwise, 2e-5 elementwise relative to max|ref|); paths that must give the same bits are compared
with torch.equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from automodel_lora.kernels import KernelOptions, all_programs_resident, lora_add, lora_linear
from automodel_lora.kernels import backend as B
from automodel_lora.kernels import lora as L
from tests.test_kernels import check, make, run_and_check

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
interp_only = pytest.mark.skipif(not (INTERPRET and B.HAS_TRITON), reason="needs TRITON_INTERPRET=1 and triton")
ENV = ("AUTOMODEL_LORA_BASE_GEMM", "AUTOMODEL_LORA_FUSE_PROJ", "AUTOMODEL_LORA_FAST_LAUNCH")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------------
# the settings object
# ------------------------------------------------------------------------------------------
def test_defaults_without_environment(clean_env):
    assert KernelOptions() == KernelOptions(base_gemm="auto", fuse_proj=True, fast_launch=True)


def test_environment_gives_defaults_and_explicit_values_win(clean_env):
    clean_env.setenv("AUTOMODEL_LORA_BASE_GEMM", "cublas")
    clean_env.setenv("AUTOMODEL_LORA_FUSE_PROJ", "0")
    clean_env.setenv("AUTOMODEL_LORA_FAST_LAUNCH", "0")
    assert KernelOptions() == KernelOptions(base_gemm="cublas", fuse_proj=False, fast_launch=False)
    assert KernelOptions(base_gemm="triton", fuse_proj=True).to_dict() == dict(base_gemm="triton", fuse_proj=True,
                                                                              fast_launch=False)
    assert KernelOptions.from_dict({"fuse_proj": True}) == KernelOptions(base_gemm="cublas", fuse_proj=True,
                                                                         fast_launch=False)


@pytest.mark.parametrize("name,value", [("AUTOMODEL_LORA_BASE_GEMM", "cutlass"), ("AUTOMODEL_LORA_FUSE_PROJ", "yes"),
                                        ("AUTOMODEL_LORA_FAST_LAUNCH", "2")])
def test_bad_environment_value_names_the_variable(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        KernelOptions()


def test_round_trip_and_validation(clean_env):
    opts = KernelOptions(base_gemm="triton", fuse_proj=False, fast_launch=True)
    assert KernelOptions.from_dict(opts.to_dict()) == opts and KernelOptions.from_dict(opts) is opts
    assert opts.replace(base_gemm="cublas") == KernelOptions(base_gemm="cublas", fuse_proj=False)
    with pytest.raises(ValueError, match="not allowed"):
        opts.replace(base_gemm="cutlass")
    with pytest.raises(ValueError, match="fuse_proj must be true or false"):
        KernelOptions(fuse_proj=1)
    with pytest.raises(ValueError, match=r"unknown KernelOptions key\(s\) \['fuse'\]"):
        KernelOptions.from_dict({"fuse": False})


def test_none_takes_the_environment_at_call_time(clean_env):
    """``options=None`` is ``KernelOptions()`` as the environment says when the call is made."""
    assert L._options(None) == KernelOptions()
    clean_env.setenv("AUTOMODEL_LORA_BASE_GEMM", "cublas")
    assert L._options(None) == KernelOptions(base_gemm="cublas")
    explicit = KernelOptions(base_gemm="triton")
    assert L._options(explicit) is explicit


# ------------------------------------------------------------------------------------------
# the fused projection's residency rule (pure: fake environments and SM counts)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env,free,resident", [
    ({}, None, True),
    ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"}, None, True),
    ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100.0"}, 132, True),
    ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}, None, False),
    ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "99.9"}, None, False),
    ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "half"}, None, False),  # unreadable: counted as a cap
    ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": ""}, None, True),  # set but empty: no cap
    ({}, 66, False),  # a partition of the device (e.g. a green context) with half its SMs
    ({}, 132, True),
])
def test_all_programs_resident(env, free, resident):
    assert all_programs_resident(132, env=env, free_sms=free) is resident


def test_residency_rule_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "25")
    assert not all_programs_resident(132)
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    assert all_programs_resident(132)


@interp_only
def test_no_fused_projection_where_programs_may_not_be_resident(monkeypatch, clean_env):
    """A device whose programs may not all be resident never takes the fused projection, whatever the
    options say; the residency verdict is asked per device (here: faked for the interpreter's CPU)."""
    from automodel_lora.kernels import dispatch as D

    x, W, _, A, B = make(37, 64, 48, 16, torch.float32, False)
    options = KernelOptions(base_gemm="triton", fuse_proj=True)
    assert D.forward_route(x, W, None, A, B, 0.0, True, options) == "fused_proj"
    monkeypatch.setattr(D, "fused_proj_safe", lambda device: False)
    assert D.forward_route(x, W, None, A, B, 0.0, True, options) == "tma"
    assert D.dx_route(torch.empty(37, 48), W, A, B, 0.0, True, options) == "tma"


# ------------------------------------------------------------------------------------------
# routing per call: two layers with different options in one process
# ------------------------------------------------------------------------------------------
def _spy(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def _two_layers(options_1, options_2):
    """Two adapted linears in a chain (K=64 -> N=48 -> 32), each with its own options; y and the leaves."""
    torch.manual_seed(0)
    x = torch.randn(37, 64, requires_grad=True)
    W1, W2 = torch.randn(48, 64) / 8, torch.randn(32, 48) / 7
    A1, B1 = (torch.randn(16, 64) / 8).requires_grad_(True), (torch.randn(48, 16) / 4).requires_grad_(True)
    A2, B2 = (torch.randn(8, 48) / 7).requires_grad_(True), (torch.randn(32, 8) / 3).requires_grad_(True)

    def forward(x, A1, B1, A2, B2):
        h = lora_linear(x, W1, None, A1, B1, 2.0, options=options_1)
        return lora_linear(h, W2, None, A2, B2, 0.5, options=options_2)

    return forward, (x, A1, B1, A2, B2), (W1, W2)


def _reference_grads(leaves, Ws, g):
    x, A1, B1, A2, B2 = (t.detach().double().requires_grad_(True) for t in leaves)
    W1, W2 = (W.double() for W in Ws)
    h = x @ W1.t() + 2.0 * (x @ A1.t()) @ B1.t()
    y = h @ W2.t() + 0.5 * (h @ A2.t()) @ B2.t()
    y.backward(g.double())
    return y, [t.grad for t in (x, A1, B1, A2, B2)]


@pytest.mark.parametrize("compiled", [False, True])
def test_two_layers_with_their_own_options(monkeypatch, compiled):
    """Layer 1 takes the fused-projection TMA GEMM ("triton"), layer 2 the cuBLAS base GEMM, in the same
    forward and backward (eager, and compiled: the options reach the custom ops as plain values): each
    layer's kernels run as its options say, and y and every gradient match float64."""
    fused_opts, cublas_opts = KernelOptions(base_gemm="triton", fuse_proj=True), KernelOptions(base_gemm="cublas")
    forward, leaves, Ws = _two_layers(fused_opts, cublas_opts)
    if compiled:
        torch._dynamo.reset()
        forward = torch.compile(forward, backend="aot_eager", fullgraph=True)
    kernels = B.use_kernels_for(torch.empty(0))
    if kernels:
        from automodel_lora.kernels import dispatch as D

        fused, expands = _spy(monkeypatch, D, "gemm_lora_proj"), _spy(monkeypatch, D, "expand")
    y = forward(*leaves)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, grads_ref = _reference_grads(leaves, Ws, g)
    check(y, y_ref, torch.float32, "y")
    for name, t, ref in zip(("dx", "dA1", "dB1", "dA2", "dB2"), leaves, grads_ref, strict=True):
        check(t.grad, ref, torch.float32, name)
    if kernels:
        assert fused == [(37, 64), (37, 48)], "layer 1: y from x and dx from dy in the fused-projection GEMM"
        assert expands == [(37, 8), (37, 8)], "layer 2: the low-rank term (xa, dyB: rank 8) expanded for cuBLAS"


@interp_only
@pytest.mark.parametrize("fuse_env,expect_fused", [("1", True), ("0", False)])
def test_environment_default_routes_calls_without_options(clean_env, monkeypatch, fuse_env, expect_fused):
    """A call without options follows the environment's defaults (read at call time); an explicit
    KernelOptions overrides them."""
    from automodel_lora.kernels import dispatch as D

    clean_env.setenv("AUTOMODEL_LORA_BASE_GEMM", "triton")
    clean_env.setenv("AUTOMODEL_LORA_FUSE_PROJ", fuse_env)
    fused = _spy(monkeypatch, D, "gemm_lora_proj")
    x, W, b, A, B = make(37, 64, 48, 16, torch.float32, True)
    run_and_check(x, W, b, A, B, 1.5, 0.0, "post", torch.float32)
    assert (len(fused) == 2) is expect_fused
    fused.clear()
    x, W, b, A, B = make(37, 64, 48, 16, torch.float32, True)
    run_and_check(x, W, b, A, B, 1.5, 0.0, "post", torch.float32,
                  options=KernelOptions(base_gemm="triton", fuse_proj=not expect_fused))
    assert (len(fused) == 2) is (not expect_fused)


# ------------------------------------------------------------------------------------------
# the launch layer: Triton-version gate, one warning, the plain path
# ------------------------------------------------------------------------------------------
def test_version_gate():
    launch = pytest.importorskip("automodel_lora.kernels.launch")
    assert launch.FAST_LAUNCH_TESTED == ((3, 6),)  # the only release the GPU suite has run with
    assert launch.untested_release("3.6.0") is None and launch.untested_release("3.6.1+git1234") is None
    for version in ("3.3.1", "3.4.0", "3.5.0rc1", "3.7.0", "3.9.0", "4.0.0"):
        assert launch.untested_release(version) == (
            f"Triton {version} is outside the releases its direct launch was tested with (3.6)"), version
    assert "not one this package can read" in launch.untested_release("nightly")

    class NoKnobs:  # a Triton without triton.knobs
        pass

    assert "launch hooks" in launch.fast_launch_status("3.6.0", NoKnobs)
    assert launch.fast_launch_status("3.2.0", NoKnobs).startswith("Triton 3.2.0 is outside")


def test_plain_launch_warns_once(monkeypatch):
    launch = pytest.importorskip("automodel_lora.kernels.launch")
    monkeypatch.setattr(launch, "PLAIN_LAUNCH_WARNED", set())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert launch.warn_plain_launch("a test reason")
        assert not launch.warn_plain_launch("a test reason")
    assert len(seen) == 1 and "a test reason" in str(seen[0].message) and "fast_launch=False" in str(seen[0].message)


class _Param:
    def __init__(self, name, constexpr):
        self.name, self.is_constexpr = name, constexpr


class _FakeJit:
    """Stands in for a jit function whose launch returns a compiled kernel without the direct-launch API
    (what a Triton whose internals moved would give)."""

    params = [_Param("a", False), _Param("n", False), _Param("BLOCK", True)]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return object()  # no run / packed_metadata / launch_metadata
        return run


@pytest.mark.parametrize("fast", [True, False])
def test_launch_without_the_direct_api_takes_the_plain_path(monkeypatch, fast):
    """A recorded plan launches through the jit function; where the direct launch cannot run (this Triton or
    its compiled kernels lack the API) nothing is recorded, one warning says why (fast_launch on), and a
    repeat call launches the plain way again: no crash."""
    launch = pytest.importorskip("automodel_lora.kernels.launch")
    monkeypatch.setattr(launch, "PLAIN_LAUNCH_WARNED", set())
    raw, sig = _FakeJit(), ("fake", -1, 7)
    a = torch.zeros(4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            assert not launch.run_cached(sig, (a,), fast=fast)
            launch.launch_plan(raw, lambda kw: (2,), (dict(BLOCK=16), 4, 2), (a, 7), {}, 1, sig, -1, fast)
    assert sig not in launch.COMPILED
    assert [g for g, _, _ in raw.launches] == [(2,), (2,)]
    assert raw.launches[0][2] == dict(BLOCK=16, num_warps=4, num_stages=2)
    assert len(seen) == (1 if fast else 0), [str(w.message) for w in seen]


@interp_only
@pytest.mark.parametrize("pos,p", [("post", 0.0), ("pre", 0.25)])
def test_fast_launch_off_gives_the_same_bits_interp(pos, p):
    """fast_launch=False (the plain launch everywhere) and True give the same bits, TMA GEMM included."""
    outs = []
    for fast in (True, False):
        options = KernelOptions(base_gemm="triton", fuse_proj=True, fast_launch=fast)
        torch.manual_seed(0)  # the same inputs both times
        x, W, b, A, B = make(37, 64, 48, 16, torch.float32, True)
        y, _ = run_and_check(x, W, b, A, B, 1.5, p, pos, torch.float32, options=options)
        outs.append((y.detach(), x.grad, A.grad, B.grad))
    for name, a, e in zip(("y", "dx", "dA", "dB"), *outs, strict=True):
        assert torch.equal(a, e), name


_SIMULATED = r"""
import sys, torch, triton
triton.__version__ = sys.argv[1]  # before the package reads it
from automodel_lora.kernels import KernelOptions, lora_linear, launch, tma_desc
assert launch.untested_release(triton.__version__) is None, launch.untested_release(triton.__version__)
assert tma_desc.DIRECT_DESCRIPTORS
torch.manual_seed(0)
x = torch.randn(37, 64, requires_grad=True); W = torch.randn(48, 64) / 8
A = (torch.randn(16, 64) / 8).requires_grad_(True); B = (torch.randn(48, 16) / 4).requires_grad_(True)
y = lora_linear(x, W, None, A, B, 1.5, options=KernelOptions(base_gemm="triton", fuse_proj=True))
y.backward(torch.ones_like(y))
torch.save([y.detach(), x.grad, A.grad, B.grad], sys.argv[2])
"""


@interp_only
def test_descriptor_paths_agree_across_triton_versions_interp(tmp_path):
    """The TMA descriptors built directly (a tested Triton release, simulated in a subprocess) and through
    TensorDescriptor's constructor (this Triton, if untested; else the direct path twice) give the same bits."""
    from automodel_lora.kernels import tma_desc
    from automodel_lora.kernels.launch import FAST_LAUNCH_TESTED

    lo = FAST_LAUNCH_TESTED[0]
    out = tmp_path / "sim.pt"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _SIMULATED, f"{lo[0]}.{lo[1]}.0", str(out)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    torch.manual_seed(0)
    x = torch.randn(37, 64, requires_grad=True)
    W = torch.randn(48, 64) / 8
    A = (torch.randn(16, 64) / 8).requires_grad_(True)
    B = (torch.randn(48, 16) / 4).requires_grad_(True)
    y = lora_linear(x, W, None, A, B, 1.5, options=KernelOptions(base_gemm="triton", fuse_proj=True))
    y.backward(torch.ones_like(y))
    sim = torch.load(out)
    for name, a, e in zip(("y", "dx", "dA", "dB"), (y.detach(), x.grad, A.grad, B.grad), sim, strict=True):
        assert torch.equal(a, e), name
    ref = x.detach().double() @ W.double().t() + 1.5 * (x.detach().double() @ A.detach().double().t()) @ \
        B.detach().double().t()
    check(y, ref, torch.float32, "y")
    assert tma_desc.TensorDescriptor is not None


def test_lora_add_takes_options(clean_env):
    """lora_add accepts options (keyword only) on every backend; results match float64."""
    x, W, _, A, B = make(29, 36, 20, 8, torch.float32)
    base = (x @ W.t()).detach()
    y = lora_add(base, x, A, B, 2.0, options=KernelOptions(base_gemm="cublas", fast_launch=False))
    ref = base.double() + 2.0 * (x.detach().double() @ A.detach().double().t()) @ B.detach().double().t()
    check(y, ref, torch.float32, "y")
    with pytest.raises(TypeError):
        lora_add(base, x, A, B, 2.0, 0.0, "post", KernelOptions())  # keyword only


@interp_only
def test_fast_launch_off_reaches_every_kernel_launched_with_fixed_tiles(monkeypatch):
    """``set_kernel_options(fast_launch=False)`` reaches every kernel ``launch_fixed`` launches: the embedding's four,
    the segmented pair of a mixed-adapter training step, the gather kernel of a mixed decode step, and DoRA's norm
    (a spy records each launch's ``fast``)."""
    import automodel_lora as al
    from automodel_lora.kernels import dora_norm, embedding_lora, gather_mm, launch, segment_mm, segment_tn

    from .conftest import tiny_llama

    seen = []
    real = launch.launch_fixed

    def spy(raw, *args):
        seen.append((raw.fn.__name__, args[-1]))
        return real(raw, *args)

    for module in (embedding_lora, segment_mm, segment_tn, dora_norm, gather_mm):
        monkeypatch.setattr(module, "launch_fixed", spy)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 8))
    dora = tiny_llama().float().train()  # the embedding's kernels and, with DoRA, the norm kernel
    al.apply_lora_to_linear_modules(dora, al.PeftConfig(target_modules=["embed_tokens", "q_proj"], dim=4,
                                                        use_dora=True))
    mixed = tiny_llama().float().train()  # a mixed-adapter training step: the segmented kernels
    for name in ("b", "c"):
        al.apply_lora_to_linear_modules(mixed, al.PeftConfig(target_modules=["q_proj"], dim=4), adapter_name=name)
    for model in (dora, mixed):
        al.set_kernel_options(model, {"fast_launch": False})
    dora(input_ids=ids).logits.sum().backward()
    with al.adapter_batch(mixed, ["b", "c"]):
        mixed(input_ids=ids).logits.sum().backward()
    with torch.no_grad(), al.adapter_batch(mixed.eval(), ["b", "c"]):
        mixed(input_ids=ids[:, :1])  # a decode step: the gather kernel
    names = {name for name, _ in seen}
    assert {"_fwd_kernel", "_db_kernel", "_dora_norm_kernel", "_segment_mm_kernel", "_segment_tn_kernel",
            "_gather_mm_kernel"} <= names
    assert all(fast is False for _, fast in seen), [s for s in seen if s[1] is not False]
