"""The ``automodel-lora`` command line and its packaging: bundled recipes by name (``recipes``, ``cp``,
``finetune --config NAME``), ``--version``, answers that import no torch, the recipes carried by a
non-editable build, the Makefile's split installs, and the finished-run message."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from automodel_lora import cli
from automodel_lora.cli import main
from automodel_lora.recipe.config import load_recipe

from .recipe_helpers import REPO, run_recipe, tiny_raw_recipe

CONFIGS = REPO / "configs"


def _bundled_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.yaml"))


# ------------------------------------------------------------------------- recipes, --version, --help


def test_recipes_lists_every_bundled_recipe_with_its_header_line(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == _bundled_names()
    quick = next(line for line in lines if line.startswith("quickstart "))
    assert quick.split(None, 1)[1] == "Quickstart: LoRA on a tiny Llama built from a config, on shipped generated text."


def test_version_and_help(capsys):
    import automodel_lora

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"automodel-lora {automodel_lora.__version__}\n"
    assert main(["-V"]) == 0 and capsys.readouterr().out.strip().endswith(automodel_lora.__version__)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("{finetune}", "{recipes}", "{cp}", "--version", "--config quickstart"):
        assert word in out
    assert main(["recipes", "--help"]) == 0 and "bundled recipes" in capsys.readouterr().out
    assert main(["cp", "--help"]) == 0 and "--force" in capsys.readouterr().out
    assert main(["cp"]) == 2 and "required" in capsys.readouterr().err


_NO_TORCH = """
import sys, types
{prelude}
from automodel_lora.cli import main
for argv in (["--help"], ["--version"], ["recipes"], ["cp", "quickstart", {dest!r}], ["finetune", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("TORCH-MODULES", len(loaded), loaded[:3])
"""


def _env() -> dict:
    """This checkout's package first on the path (a subprocess in tmp_path could import another install)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _run_no_torch(tmp_path, prelude: str = "") -> str:
    code = _NO_TORCH.format(prelude=prelude, dest=str(tmp_path / "copy.yaml"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_module_answers_help_version_recipes_cp_without_torch(tmp_path):
    # The package's __init__ imports torch (its public API is torch modules); stand in an empty
    # package object for it so that what is measured is cli.py and what `recipes` / `cp` / `--help` load.
    prelude = (
        "pkg = types.ModuleType('automodel_lora'); "
        f"pkg.__path__ = [{str(REPO / 'automodel_lora')!r}]; sys.modules['automodel_lora'] = pkg"
    )
    out = _run_no_torch(tmp_path, prelude)
    assert "TORCH-MODULES 0 []" in out, out
    assert "automodel-lora 0." in out and "quickstart" in out
    assert (tmp_path / "copy.yaml").is_file()


def test_console_script_answers_without_torch(tmp_path):
    """End to end, as the console script imports it (``from automodel_lora.cli import main``)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, automodel_lora; print('torch' in sys.modules)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_env(),
    )
    if probe.stdout.strip() == "True":
        pytest.skip("automodel_lora/__init__.py imports torch eagerly; the CLI itself does not (test above)")
    out = _run_no_torch(tmp_path)
    assert "TORCH-MODULES 0 []" in out, out
    assert "automodel-lora 0." in out and (tmp_path / "copy.yaml").is_file()


# ------------------------------------------------------------------------ finetune --config NAME


@pytest.mark.parametrize("name", ["quickstart", "quickstart.yaml"])
def test_finetune_takes_a_bundled_recipe_by_name_from_any_directory(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--config", name, "--print-config", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    first, body = out.split("\n", 1)
    assert first.startswith("# merged config from ") and first.endswith("quickstart.yaml + train.max_steps=3")
    data = Path(yaml.safe_load(body)["data"]["path"])
    assert data.is_absolute() and data.is_file() and data.name == "quickstart.jsonl"
    assert not (tmp_path / "outputs").exists()


def test_finetune_default_is_the_bundled_quickstart(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.default_config() == cli.bundled_recipes()["quickstart"]
    assert main(["finetune", "--print-config"]) == 0
    assert "quickstart.yaml" in capsys.readouterr().out.splitlines()[0]


def test_a_file_wins_over_a_bundled_name_and_unknown_names_list_the_bundled_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("train: {max_steps: 2}\n")
    assert cli.resolve_recipe("quickstart") == Path("quickstart")
    assert main(["finetune", "--config", "quickstrat", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "recipe not found: quickstrat" in err and "bundled: " + ", ".join(_bundled_names()) in err


# --------------------------------------------------------------------------------------------- cp


def test_cp_copies_a_recipe_and_its_data_so_the_copy_runs_as_is(tmp_path, capsys):
    dest = tmp_path / "mine" / "my.yaml"
    assert main(["cp", "quickstart", str(dest)]) == 0
    assert "copied quickstart to" in capsys.readouterr().out
    assert dest.read_bytes() == (CONFIGS / "quickstart.yaml").read_bytes()
    copied_data = tmp_path / "mine" / "data" / "quickstart.jsonl"
    assert copied_data.read_bytes() == (CONFIGS / "data" / "quickstart.jsonl").read_bytes()
    assert load_recipe(dest).data.path == str(copied_data.resolve())
    # Into a directory: DIR/NAME.yaml; recipes without relative data copy only themselves.
    assert main(["cp", "llama3_8b_lora", str(tmp_path)]) == 0
    assert (tmp_path / "llama3_8b_lora.yaml").is_file() and not (tmp_path / "data").exists()


def test_cp_refuses_to_overwrite_without_force(tmp_path, capsys):
    dest = tmp_path / "my.yaml"
    dest.write_text("# mine\n")
    assert main(["cp", "quickstart", str(dest)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert dest.read_text() == "# mine\n" and not (tmp_path / "data").exists()
    # A different data file already there is refused too; the same bytes are fine.
    other = tmp_path / "other.yaml"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "quickstart.jsonl").write_text('{"text": "my own"}\n')
    assert main(["cp", "quickstart", str(other)]) == 1
    assert "quickstart.jsonl already exists" in capsys.readouterr().err and not other.exists()
    assert main(["cp", "quickstart", str(dest), "--force"]) == 0
    assert dest.read_bytes() == (CONFIGS / "quickstart.yaml").read_bytes()
    assert main(["cp", "quickstart", str(other)]) == 0  # data now identical to the bundled file
    assert main(["cp", "nope", str(tmp_path / "x.yaml")]) == 2
    assert "no bundled recipe 'nope'; bundled: " in capsys.readouterr().err


# ------------------------------------------------------------------------------------ packaging


def test_build_carries_the_recipes_as_package_data(tmp_path):
    """What a wheel / non-editable `pip install .` contains: configs/ copied to automodel_lora/_recipes/."""
    build = tmp_path / "build"
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    recipes = build / "automodel_lora" / "_recipes"
    expected = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".jsonl", ".json"))
    assert sorted(str(p.relative_to(recipes)) for p in recipes.rglob("*") if p.is_file()) == expected
    assert (build / "automodel_lora" / "cli.py").is_file()
    # The installed copy is what the CLI reads when there is no checkout around it.
    installed = tmp_path / "site" / "automodel_lora"
    shutil.copytree(build / "automodel_lora", installed)
    code = (
        "import sys, types; pkg = types.ModuleType('automodel_lora'); "
        f"pkg.__path__ = [{str(installed)!r}]; sys.modules['automodel_lora'] = pkg; "
        "from automodel_lora import cli; print(cli.recipes_dir())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(installed.resolve() / "_recipes"), out.stderr
    manifest = (REPO / "MANIFEST.in").read_text()
    assert "recursive-include configs *.yaml *.jsonl *.json" in manifest  # the sdist carries them too


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def _reqs(text: str) -> set[str]:
    return {line.split(";")[0].split(">")[0].split("=")[0].strip() for line in text.strip().splitlines() if line.strip()}


def test_extras_split_quickstart_from_test():
    cfg = _setup_cfg()
    assert _reqs(cfg["options"]["install_requires"]) == {"torch", "pyyaml", "safetensors"}
    extras = cfg["options.extras_require"]
    assert _reqs(extras["hf"]) == {"transformers"}
    assert {"pytest", "peft", "bitsandbytes", "triton", "ruff", "transformers"} <= _reqs(extras["test"])


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_quickstart_installs_only_the_quickstart_extras_and_test_the_rest():
    def dry(target: str) -> str:
        proc = subprocess.run(
            ["make", "-n", "-B", target, f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    quick, test = dry("quickstart"), dry("test")
    assert "pip install -q -e '.[hf]'" in quick and "test]" not in quick
    assert "scripts/finetune.py --config configs/quickstart.yaml" in quick
    assert "pip install -q -e '.[hf,test]'" in test and "pytest -q tests" in test


# ------------------------------------------------------------------------- finished run message


def test_finished_run_says_how_to_start_over(tmp_path):
    raw = tiny_raw_recipe(tmp_path, train={"max_steps": 2}, checkpoint={"resume": "auto"})
    first, _ = run_recipe(raw)
    again, log = run_recipe(raw)
    assert again == first and "nothing to train" in log
    assert "checkpoint.resume=null checkpoint.overwrite=true" in log and "checkpoint.output_dir=" in log
    # Doing what it says starts a new run (the finished one is kept, renamed).
    raw["checkpoint"].update(resume=None, overwrite=True)
    fresh, log = run_recipe(raw)
    assert "nothing to train" not in log and "[resume]" not in log
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == fresh
    assert any(p.name.startswith("out.old-") for p in tmp_path.iterdir())
    assert os.path.isdir(tmp_path / "out" / "adapter")


def test_recipes_into_a_closed_pipe_exits_quietly(tmp_path):
    """`automodel-lora recipes | head -1`: no BrokenPipeError traceback."""
    code = (
        "import sys, types; pkg = types.ModuleType('automodel_lora'); "
        f"pkg.__path__ = [{str(REPO / 'automodel_lora')!r}]; sys.modules['automodel_lora'] = pkg; "
        "import time; time.sleep(0.5); from automodel_lora.cli import main; sys.exit(main(['recipes']))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
