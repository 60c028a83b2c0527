"""Command line: ``automodel-lora finetune --config RECIPE.yaml [section.key=value ...]``.

``scripts/finetune.py`` is the same command without the subcommand word, which is what
``torchrun`` launches: ``torchrun --nproc-per-node 8 scripts/finetune.py --config ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "finetune_main", "default_config"]


def default_config() -> Path | None:
    """``configs/quickstart.yaml`` of a source checkout / editable install, if present."""
    p = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    return p if p.is_file() else None


def _finetune_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="LoRA / QLoRA fine-tuning from a YAML recipe.",
        epilog=(
            "overrides: dotted section.key=value pairs, values parsed as YAML, e.g.\n"
            "  peft.dim=16 train.max_steps=50 train.lr=1e-4 'peft.target_modules=[q_proj,v_proj]'\n"
            "multi-GPU: torchrun --nproc-per-node 8 scripts/finetune.py --config RECIPE.yaml distributed.strategy=fsdp2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", "-c", help="recipe YAML (default: configs/quickstart.yaml of this checkout)")
    ap.add_argument("--print-config", action="store_true", help="print the merged, validated config and exit")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    return ap


def finetune_main(argv: Sequence[str] | None = None, prog: str = "finetune") -> int:
    """Parse ``--config ... [overrides]``, validate, run. Returns the exit code."""
    from .recipe.config import ConfigError, load_recipe

    args = _finetune_parser(prog).parse_args(argv)
    config = args.config
    if config is None:
        config = default_config()
        if config is None:
            print(f"{prog}: error: --config is required (no configs/quickstart.yaml next to the package)", file=sys.stderr)
            return 2
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``automodel-lora`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"finetune": "fine-tune from a YAML recipe (see `automodel-lora finetune --help`)"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        usage = "usage: automodel-lora {finetune} ...\n\ncommands:\n" + "".join(f"  {k:10s} {v}\n" for k, v in commands.items())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"automodel-lora: error: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
            return 2
        print(usage, end="")
        return 0 if argv else 2
    return finetune_main(argv[1:], prog="automodel-lora finetune")


if __name__ == "__main__":
    sys.exit(main())
