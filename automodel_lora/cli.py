"""Command line: ``automodel-lora finetune --config RECIPE [section.key=value ...]``; also ``generate``
(batch generation with mixed adapters: ``automodel_lora.batch_generate``), ``recipes`` and ``cp``.

``RECIPE`` is a YAML file or the name of a bundled recipe (``automodel-lora recipes`` lists them;
``automodel-lora cp NAME my.yaml`` copies one to edit). The bundled recipes are the repository's
``configs/``; a non-editable install carries a copy as ``automodel_lora/_recipes/`` (see setup.py).

``scripts/finetune.py`` is the same command without the subcommand word, which is what
``torchrun`` launches: ``torchrun --nproc-per-node 8 scripts/finetune.py --config ...``.

This module imports neither torch nor the rest of the package at import time: ``--help``,
``--version``, ``recipes`` and ``cp`` answer without loading torch (only ``finetune`` does).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "finetune_main", "default_config", "recipes_dir", "bundled_recipes", "resolve_recipe", "version"]

_PKG_DIR = Path(__file__).resolve().parent
# Keys whose relative values a recipe YAML resolves against its own directory (recipe/config.py).
_RELATIVE_KEYS = (("data", "path"), ("data", "validation_path"), ("data", "tokenizer"), ("model", "name_or_path"))


def recipes_dir() -> Path | None:
    """Where the bundled recipes are: the installed copy, else ``configs/`` of the checkout."""
    for d in (_PKG_DIR / "_recipes", _PKG_DIR.parent / "configs"):
        if d.is_dir():
            return d
    return None


def bundled_recipes() -> dict[str, Path]:
    """The bundled recipes by name (the file name without ``.yaml``), sorted."""
    d = recipes_dir()
    return {p.stem: p for p in sorted(d.glob("*.yaml"))} if d is not None else {}


def default_config() -> Path | None:
    """The bundled ``quickstart`` recipe, if present."""
    return bundled_recipes().get("quickstart")


def resolve_recipe(config: str | os.PathLike) -> Path | None:
    """``config`` as a file: an existing path as given, else the bundled recipe of that name (``.yaml`` optional)."""
    p = Path(config)
    if p.is_file():
        return p
    name = str(config)
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    return bundled_recipes().get(name)


def version() -> str:
    """The package's version, read without importing the package (which imports torch)."""
    try:
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', (_PKG_DIR / "__init__.py").read_text("utf-8"), re.M)
        if m:
            return m.group(1)
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("automodel_lora")
    except PackageNotFoundError:
        return "unknown"


def _header(path: Path) -> str:
    """The first line of a recipe's header comment, without the ``#``."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                s = line.strip()
                if not s.startswith("#"):
                    return ""
                s = s.lstrip("#").strip()
                if s:
                    return s
    except (OSError, UnicodeDecodeError):
        pass
    return ""


# --------------------------------------------------------------------------------------------- finetune


def _finetune_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="LoRA / QLoRA fine-tuning from a YAML recipe.",
        epilog=(
            "RECIPE: a YAML file, or a bundled recipe's name (`automodel-lora recipes` lists them), e.g. quickstart\n"
            "overrides: dotted section.key=value pairs, values parsed as YAML, e.g.\n"
            "  peft.dim=16 train.max_steps=50 train.lr=1e-4 'peft.target_modules=[q_proj,v_proj]'\n"
            "multi-GPU: torchrun --nproc-per-node 8 scripts/finetune.py --config RECIPE.yaml distributed.strategy=fsdp2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", "-c", metavar="RECIPE", help="recipe YAML file or bundled recipe name (default: quickstart)")
    ap.add_argument("--print-config", action="store_true", help="print the merged, validated config and exit")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    return ap


def finetune_main(argv: Sequence[str] | None = None, prog: str = "finetune") -> int:
    """Parse ``--config ... [overrides]``, validate, run. Returns the exit code."""
    args = _finetune_parser(prog).parse_args(argv)
    config = args.config
    if config is None:
        config = default_config()
        if config is None:
            print(f"{prog}: error: --config is required (no bundled quickstart recipe found)", file=sys.stderr)
            return 2
    else:
        found = resolve_recipe(config)
        if found is None:
            names = ", ".join(bundled_recipes()) or "none found"
            print(f"{prog}: error: recipe not found: {config} (no such file, and no bundled recipe of that name; "
                  f"bundled: {names})", file=sys.stderr)
            return 2
        config = found
    from .recipe.config import ConfigError, load_recipe

    try:
        cfg = load_recipe(config, args.overrides)
        if args.print_config:
            sys.stdout.write(
                f"# merged config from {config}" + (f" + {' '.join(args.overrides)}" if args.overrides else "") + "\n"
            )
            sys.stdout.write(cfg.to_yaml())
            return 0
        from .recipe.train import finetune

        finetune(cfg)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------- recipes and cp


def recipes_main(argv: Sequence[str] | None = None, prog: str = "automodel-lora recipes") -> int:
    """List the bundled recipes: name and the first line of each one's header comment."""
    ap = argparse.ArgumentParser(prog=prog, description="List the bundled recipes (use one with `finetune --config NAME`).")
    ap.parse_args(argv)
    recipes = bundled_recipes()
    if not recipes:
        print(f"{prog}: error: no bundled recipes found (looked in {_PKG_DIR / '_recipes'} and {_PKG_DIR.parent / 'configs'})",
              file=sys.stderr)
        return 1
    width = max(len(n) for n in recipes)
    for name, path in recipes.items():
        print(f"{name:{width}s}  {_header(path)}".rstrip())
    return 0


def _referenced_files(recipe: Path) -> list[str]:
    """Relative paths a recipe YAML names (resolved against its directory) that exist next to it."""
    import yaml

    try:
        raw = yaml.safe_load(recipe.read_text("utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    values = [raw.get(sec, {}).get(key) if isinstance(raw.get(sec), dict) else None for sec, key in _RELATIVE_KEYS]
    adapters = raw.get("data", {}).get("adapters") if isinstance(raw.get("data"), dict) else None
    if isinstance(adapters, dict):  # data.adapters: one file per adapter
        values += list(adapters.values())
    return [value for value in values if isinstance(value, str) and value and value != "byte"
            and not os.path.isabs(value) and (recipe.parent / value).is_file()]


def _same_file_content(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def cp_main(argv: Sequence[str] | None = None, prog: str = "automodel-lora cp") -> int:
    """Copy a bundled recipe (and the data files it names by relative path) to edit it."""
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Copy a bundled recipe to a file you can edit; data files it names by relative path "
        "(the quickstart's data/quickstart.jsonl) are copied next to it, so the copy runs as it is.",
    )
    ap.add_argument("name", help="bundled recipe name (`automodel-lora recipes` lists them)")
    ap.add_argument("dest", help="destination file, or an existing directory (the copy is then DEST/NAME.yaml)")
    ap.add_argument("--force", "-f", action="store_true", help="overwrite existing files")
    args = ap.parse_args(argv)
    recipes = bundled_recipes()
    name = args.name[: -len(".yaml")] if args.name.endswith(".yaml") else args.name
    if name not in recipes:
        print(f"{prog}: error: no bundled recipe {args.name!r}; bundled: {', '.join(recipes) or 'none found'}",
              file=sys.stderr)
        return 2
    src = recipes[name]
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    copies = [(src, dest)] + [(src.parent / rel, dest.parent / rel) for rel in _referenced_files(src)]
    if not args.force:
        # The recipe itself is never silently replaced; a data file already there with the same bytes is fine.
        clash = [d for s, d in copies if d.exists() and (d == dest or not _same_file_content(s, d))]
        if clash:
            print(f"{prog}: error: {', '.join(map(str, clash))} already exists; pass --force to overwrite", file=sys.stderr)
            return 1
    for _, d in copies:
        if d.is_dir():
            print(f"{prog}: error: {d} is a directory", file=sys.stderr)
            return 1
    try:
        for s, d in copies:
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s, d)
    except OSError as e:
        print(f"{prog}: error: can't copy: {e}", file=sys.stderr)
        return 1
    print(f"copied {name} to {dest}" + "".join(f"\n  and {d}" for _, d in copies[1:]))
    print(f"run it: automodel-lora finetune --config {dest}")
    return 0


# ------------------------------------------------------------------------------------------- dispatch

_COMMANDS = {
    "finetune": ("--config RECIPE [section.key=value ...]", "fine-tune from a recipe (`automodel-lora finetune --help`)"),
    "recipes": ("", "list the bundled recipes"),
    "cp": ("NAME DEST [--force]", "copy a bundled recipe to edit it"),
    "generate": ("--config GEN.yaml [key=value ...]", "batch generation, each prompt with its own adapter "
                 "(`automodel-lora generate --help`)"),
}


def _usage() -> str:
    lines = [f"automodel-lora {{{k}}} {a}".rstrip() for k, (a, _) in _COMMANDS.items()] + ["automodel-lora --version"]
    return (
        "usage: " + "\n       ".join(lines) + "\n\ncommands:\n"
        + "".join(f"  {k:10s} {h}\n" for k, (_, h) in _COMMANDS.items())
        + "\nRECIPE is a YAML file or a bundled recipe's name, e.g. `automodel-lora finetune --config quickstart`.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``automodel-lora`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"automodel-lora {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"automodel-lora: error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr, end="")
            return 2
        print(_usage(), end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    prog = f"automodel-lora {command}"
    try:
        if command == "recipes":
            rc = recipes_main(rest, prog=prog)
            sys.stdout.flush()  # inside the try: a closed pipe is found here, not at exit
            return rc
        if command == "cp":
            return cp_main(rest, prog=prog)
        if command == "generate":
            from .batch_generate import generate_main

            return generate_main(rest, prog=prog)
        return finetune_main(rest, prog=prog)
    except SystemExit as e:  # argparse's --help (0) and usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    except BrokenPipeError:  # `automodel-lora recipes | head -1`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
