"""Shared fixtures: fixed seeds, a reporting `assert_close`, tiny models built with no download."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# Tolerances per dtype for one matmul-sized computation compared against a
# float64 reference: about 8 units of the format's rounding (eps: fp32 1.2e-7,
# fp16 9.8e-4, bf16 7.8e-3) relative, and an absolute floor for values near 0.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (8e-3, 2e-3),
    torch.bfloat16: (6e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, what: str = "tensor"):
    """`torch.testing.assert_close` with per-dtype tolerances and a report of how many elements differ and where."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    actual64, expected64 = actual.detach().double(), expected.detach().double()
    if actual64.shape != expected64.shape:
        raise AssertionError(f"{what}: shape {tuple(actual64.shape)} != expected {tuple(expected64.shape)}")
    bad = (actual64 - expected64).abs() > atol + rtol * expected64.abs()
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ beyond rtol={rtol}, atol={atol}; "
            f"first at {idx}: {actual64[tuple(idx)].item()} vs {expected64[tuple(idx)].item()}; "
            f"max abs diff {(actual64 - expected64).abs().max().item():.3e}"
        )


def scaled_check(rtol: float, atol: float):
    """``check(actual, expected, what)``: elementwise ``|a - e| <= rtol |e| + atol max|e|``, all finite, naming the
    worst difference (the tolerances derived by the calling test file)."""

    def check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        a, e = actual.detach().double(), expected.detach().double()
        assert a.shape == e.shape and torch.isfinite(a).all(), what
        excess = (a - e).abs() - (rtol * e.abs() + atol * e.abs().max())
        assert excess.max() <= 0, f"{what}: off by {(a - e).abs().max().item():.3g} (max |e| {e.abs().max().item():.3g})"

    return check


def reference_check(tolerances: dict):
    """``check(actual, expected, dtype, what)``: a normwise (``tolerances[dtype][0]``, relative to the reference's
    norm) and elementwise (``[1]``, relative to its largest value) comparison against a float64 reference,
    reporting how many elements fail and the first of them. Each kernel test file derives its tolerances."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
        norm_tol, elem_tol = tolerances[dtype]
        assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
        assert torch.isfinite(a).all(), f"{what}: non-finite values"
        scale = e.abs().max().clamp_min(1e-30)
        rel = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
        bad = (a - e).abs() > elem_tol * scale
        msg = (f"{what}: normwise rel err {rel:.2e} (tol {norm_tol:.0e}); {int(bad.sum())}/{bad.numel()} elements "
               f"beyond {elem_tol:.0e}*max|ref|")
        if bad.any():
            idx = tuple(bad.nonzero()[0].tolist())
            msg += f", first at {idx}: {a[idx].item():.6g} vs {e[idx].item():.6g}"
        assert rel <= norm_tol and not bad.any(), msg

    return check


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


KERNEL_ENV = ("AUTOMODEL_LORA_BASE_GEMM", "AUTOMODEL_LORA_FUSE_PROJ", "AUTOMODEL_LORA_FAST_LAUNCH")


@pytest.fixture
def kernel_options(monkeypatch):
    """``kernel_options(**fields)``: a ``KernelOptions`` with ``fields`` and the built-in defaults for the rest
    (the AUTOMODEL_LORA_* environment defaults are cleared for this test, so a CI environment cannot change
    what a test runs)."""
    from automodel_lora.kernels import KernelOptions

    for name in KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)

    def build(**fields) -> KernelOptions:
        return KernelOptions(**fields)

    return build


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(**overrides) -> nn.Module:
    """A 2-layer Llama with hidden size 32, random weights, fp32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1234)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


class ToyModel(nn.Module):
    """Linears at a few depths plus non-linear modules, to exercise the matcher."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 12)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {"q_proj": nn.Linear(12, 12), "fc1": nn.Linear(12, 20), "fc2": nn.Linear(20, 12), "norm": nn.LayerNorm(12)}
            )
            for _ in range(4)
        )
        self.lm_head = nn.Linear(12, 16, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer["norm"](h + layer["q_proj"](h))
            h = h + layer["fc2"](torch.relu(layer["fc1"](h)))
        return self.lm_head(h)

    def get_output_embeddings(self):
        return self.lm_head


def edit_adapter_files(path, config=None, tensors=None):
    """Rewrite a saved adapter directory: `config` keys merged into adapter_config.json, `tensors(old) -> new` applied
    to adapter_model.safetensors (the tests of files that disagree with themselves or with the model)."""
    import json

    from safetensors.torch import load_file, save_file

    if config is not None:
        config_path = path / "adapter_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **config}))
    if tensors is not None:
        weights = path / "adapter_model.safetensors"
        save_file(tensors(load_file(weights)), weights)
