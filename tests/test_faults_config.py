"""Bad recipes and bad data under the command line: a message naming the file and the fix, exit code 2.

Each case here was a traceback (rc=1) or a silent misread before: a data file that is not UTF-8,
JSON nested deeper than Python's recursion limit, a recipe YAML with either fault, a tokenizer
directory with no tokenizer, a JSON escape of an unpaired surrogate.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from automodel_lora.cli import finetune_main
from automodel_lora.recipe.config import ConfigError, DataConfig, load_recipe, parse_override
from automodel_lora.recipe.data import build_datasets, load_jsonl
from automodel_lora.recipe.tokenizer import ByteTokenizer, build_tokenizer

from .recipe_helpers import QUICKSTART, tiny_raw_recipe

TOK = ByteTokenizer()
# Deeper than any recursion limit Python runs with: json and PyYAML both recurse once per level.
TOO_DEEP = 100_000


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def run_cli(tmp_path, monkeypatch, capsys, raw: dict | None = None, recipe_text: bytes | None = None):
    """``finetune.py --config r.yaml`` in-process from ``tmp_path``; returns (rc, stderr)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(recipe_text if recipe_text is not None else yaml.safe_dump(raw).encode())
    monkeypatch.chdir(tmp_path)
    rc = finetune_main(["--config", str(recipe)], prog="finetune.py")
    return rc, capsys.readouterr().err


def assert_message_not_traceback(err: str, *parts: str):
    assert err.startswith("finetune.py: error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, (part, err)


# ------------------------------------------------------------------------------ data file: not UTF-8


def test_a_data_file_that_is_not_utf8_names_the_file_line_and_column(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [b'{"text": "ok"}', b"", b'{"text": "caf\xe9"}'])
    with pytest.raises(ConfigError) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: not UTF-8 text (byte 0xe9 at column 14); save the file as UTF-8")


def test_line_numbers_count_crlf_and_lone_cr_line_ends_as_text_files_do(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r{"text": "\xff"}\r\n')
    with pytest.raises(ConfigError, match=r"d.jsonl:3: not UTF-8 text \(byte 0xff at column 11\)"):
        load_jsonl(path)
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b"}\r{"text": "c\xe2\x80\xa8d"}\r\n')  # U+2028 inside a string
    assert [r["text"] for r in load_jsonl(path)] == ["a", "b", "c\u2028d"]


def test_a_utf8_byte_order_mark_is_read_past(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [b'\xef\xbb\xbf{"text": "first"}', b'{"text": "second"}'])
    assert [r["text"] for r in load_jsonl(path)] == ["first", "second"]


def test_the_recipe_exits_2_naming_a_non_utf8_data_file_and_line(tmp_path, monkeypatch, capsys):
    data = write_lines(tmp_path / "latin1.jsonl", [b'{"text": "Gr\xfc\xdfe"}'] * 50)
    rc, err = run_cli(tmp_path, monkeypatch, capsys, tiny_raw_recipe(tmp_path, data_file=data))
    assert rc == 2
    assert_message_not_traceback(err, f"{data}:1: not UTF-8 text", "save the file as UTF-8")


# ------------------------------------------------------------------------------ data file: nested too deep


def test_json_nested_too_deep_names_the_file_and_line(tmp_path):
    deep = b'{"text": ' + b"[" * TOO_DEEP + b"]" * TOO_DEEP + b"}"
    path = write_lines(tmp_path / "d.jsonl", [b'{"text": "ok"}', deep])
    with pytest.raises(ConfigError) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:2: JSON nested too deep to read")


def test_the_recipe_exits_2_naming_a_too_deep_data_line(tmp_path, monkeypatch, capsys):
    deep = b"[" * TOO_DEEP + b"]" * TOO_DEEP
    data = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": f"line {i}"}).encode() for i in range(40)] + [deep])
    rc, err = run_cli(tmp_path, monkeypatch, capsys, tiny_raw_recipe(tmp_path, data_file=data))
    assert rc == 2
    assert_message_not_traceback(err, f"{data}:41: JSON nested too deep to read")


# ------------------------------------------------------------------------------ the recipe file itself


def test_a_recipe_yaml_that_is_not_utf8_names_the_file_and_line(tmp_path, monkeypatch, capsys):
    text = yaml.safe_dump(tiny_raw_recipe(tmp_path)).encode() + b"# r\xe9sum\xe9\n"
    n_lines = text.count(b"\n")
    rc, err = run_cli(tmp_path, monkeypatch, capsys, recipe_text=text)
    assert rc == 2
    assert_message_not_traceback(err, f"r.yaml:{n_lines}: not UTF-8 text (byte 0xe9 at column 4)")


def test_a_recipe_yaml_nested_too_deep_is_a_config_error(tmp_path, monkeypatch, capsys):
    text = b"model: " + b"[" * TOO_DEEP + b"]" * TOO_DEEP + b"\n"
    rc, err = run_cli(tmp_path, monkeypatch, capsys, recipe_text=text)
    assert rc == 2
    assert_message_not_traceback(err, "r.yaml: not valid YAML: nested too deep to read")
    with pytest.raises(ConfigError, match="override 'train.betas=.*': value is not valid YAML: nested too deep"):
        parse_override("train.betas=" + "[" * TOO_DEEP + "]" * TOO_DEEP)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_recipe_and_data_files_are_config_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(QUICKSTART.read_text())
    recipe.chmod(0)
    with pytest.raises(ConfigError, match="r.yaml: can't read the recipe: Permission denied"):
        load_recipe(recipe)
    data = write_lines(tmp_path / "d.jsonl", [b'{"text": "ok"}'])
    data.chmod(0)
    with pytest.raises(ConfigError, match="`data.path`: can't read .*d.jsonl: Permission denied"):
        load_jsonl(data)


# ------------------------------------------------------------------------------ other bad data


def test_an_unpaired_surrogate_escape_names_the_file_and_record(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [b'{"text": "fine"}', b'{"text": "bad \\ud800 escape"}'])
    with pytest.raises(ConfigError, match=r"d.jsonl: record 2 holds '\\ud800', an unpaired UTF-16 surrogate escape"):
        build_datasets(DataConfig(path=str(path)), TOK, seed=0)


def test_a_tokenizer_directory_without_a_tokenizer_is_a_config_error(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "tok").mkdir()
    with pytest.raises(ConfigError, match=r"(?s)`data.tokenizer`: can't load a tokenizer from .*tok.*set `data.tokenizer`"):
        build_tokenizer(str(tmp_path / "tok"), None)
