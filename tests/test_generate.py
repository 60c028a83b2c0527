"""``automodel-lora generate``: batch generation with mixed adapters from a JSONL of prompts.

Each completion must equal the greedy completion of its prompt generated alone with its adapter loaded
alone (or the base model): the mixed batches (left padding, sorted by length, several adapters and none)
change nothing. Bad inputs exit 2 naming the line or key.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import automodel_lora as al
from automodel_lora.cli import main
from automodel_lora.recipe.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=256, eos_token_id=257,
                      pad_token_id=258)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "base")
    for name, dim in (("a", 4), ("b", 8)):
        model = LlamaForCausalLM.from_pretrained(tmp / "base")
        al.apply_lora_to_linear_modules(model, al.PeftConfig(match_all_linear=True, dim=dim, alpha=2 * dim))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        al.save_adapter(model, tmp / name)
    prompts = [("Once upon", "a"), ("The cat sat on the", "b"), ("Hi", None), ("A long long prompt here", "a"),
               ("Zebra", "b")]
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "adapter": a}) + "\n" for p, a in prompts))
    config = {"base_model": "base", "adapters": {"a": "a", "b": "b"}, "input": "prompts.jsonl",
              "output": "out/completions.jsonl", "tokenizer": "byte", "batch_size": 3, "max_new_tokens": 8}
    (tmp / "gen.yaml").write_text(yaml.safe_dump(config))
    return tmp, prompts


def _alone(tmp, prompt: str, adapter: str | None) -> str:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tmp / "base").eval()
    if adapter is not None:
        al.load_adapter(model, tmp / adapter)
    tok = ByteTokenizer()
    ids = torch.tensor([[tok.bos_token_id] + tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[: out.index(tok.eos_token_id)]
    return tok.decode(out)


def test_mixed_batches_give_each_prompt_its_own_adapters_completion(setup):
    tmp, prompts = setup
    assert main(["generate", "--config", str(tmp / "gen.yaml")]) == 0
    lines = [json.loads(x) for x in (tmp / "out" / "completions.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in lines] == prompts  # the input's order
    for r in lines:
        assert r["completion"] == _alone(tmp, r["prompt"], r["adapter"]), r
    assert len({r["completion"] for r in lines}) > 1


def test_bad_inputs_exit_2_naming_the_line_or_key(setup, tmp_path, capsys):
    tmp, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "adapter": "a"}\n{"prompt": "y", "adapter": "zzz"}\n')
    assert main(["generate", "--config", str(tmp / "gen.yaml"), f"input={bad}"]) == 2
    assert "bad.jsonl:2 names adapter 'zzz'" in capsys.readouterr().err
    assert main(["generate", "--config", str(tmp / "gen.yaml"), "batch_size=0"]) == 2
    assert "`batch_size` must be a positive integer" in capsys.readouterr().err
    assert main(["generate", "--config", str(tmp / "gen.yaml"), "colour=red"]) == 2
    assert "unknown key(s) ['colour']" in capsys.readouterr().err
