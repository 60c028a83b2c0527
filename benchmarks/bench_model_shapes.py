"""The decoders of the model section (bench_model.py): three Llama-shaped models, random init, by name.

Only the shapes that set the work of a training step are taken from the real models (widths, heads, layers,
vocabulary, tied embeddings, biases); the rotary settings are left at their defaults: they change the
position encoding's values, not its cost.

  8b    Llama-3-8B widths, 4 layers (the protocol's model, BENCHMARK.md section 2)
  1b    Llama-3.2-1B: 16 layers, the output head tied to the embedding
  0.5b  Qwen2.5-0.5B: 24 layers, q/k/v with bias, tied head (``Qwen2ForCausalLM``; a Llama with the same
        widths and biases on the attention where transformers has no Qwen2)
"""

from __future__ import annotations

from dataclasses import dataclass

BATCH, SEQ = 2, 2048  # tokens per step: 2 x 2048
SMOKE_BATCH, SMOKE_SEQ = 2, 32


@dataclass(frozen=True)
class ModelShape:
    """A decoder's widths and the family that builds it."""

    name: str
    family: str  # "llama" or "qwen2"
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    tied: bool  # the output head shares the input embedding's weight

    def title(self) -> str:
        return (f"{self.name}: {self.family} {self.layers} layers, hidden {self.hidden}/{self.intermediate}, "
                f"heads {self.heads}/{self.kv_heads}, vocab {self.vocab}" + (", tied head" if self.tied else ""))

    def build(self):
        """(config, model class, arch name): Qwen2's classes for the qwen2 family where transformers has them."""
        common = dict(hidden_size=self.hidden, intermediate_size=self.intermediate, num_attention_heads=self.heads,
                      num_key_value_heads=self.kv_heads, num_hidden_layers=self.layers, vocab_size=self.vocab,
                      tie_word_embeddings=self.tied)
        if self.family == "qwen2":
            try:
                from transformers import Qwen2Config, Qwen2ForCausalLM
            except ImportError:  # older transformers: the same widths in a Llama, biases on the attention
                from transformers import LlamaConfig, LlamaForCausalLM

                return LlamaConfig(attention_bias=True, **common), LlamaForCausalLM, "llama (qwen2 widths)"
            return Qwen2Config(rms_norm_eps=1e-6, **common), Qwen2ForCausalLM, "qwen2"
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaConfig(**common), LlamaForCausalLM, "llama"


SHAPES = {
    "8b": ModelShape("8b", "llama", 4096, 14336, 32, 8, 4, 32000, tied=False),
    "1b": ModelShape("1b", "llama", 2048, 8192, 32, 8, 16, 128256, tied=True),
    "0.5b": ModelShape("0.5b", "qwen2", 896, 4864, 14, 2, 24, 151936, tied=True),
}


def smoke_shape(shape: ModelShape) -> ModelShape:
    """The same family, tying and layer structure at tiny widths (the --smoke check of the script itself)."""
    return ModelShape(shape.name, shape.family, 64, 128, 4, 2, 2, 256, shape.tied)


def select(names: list[str], smoke: bool) -> list[ModelShape]:
    """The shapes named (in that order), tiny under --smoke.

    Raises:
        ValueError: a name that is not one of SHAPES.
    """
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"--model-shapes: unknown {unknown}; choose from {list(SHAPES)}")
    return [smoke_shape(SHAPES[n]) if smoke else SHAPES[n] for n in names]
