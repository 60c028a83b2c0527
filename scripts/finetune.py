#!/usr/bin/env python
"""Fine-tune with LoRA / QLoRA from a YAML recipe.

    python scripts/finetune.py --config configs/quickstart.yaml [section.key=value ...]
    torchrun --nproc-per-node 8 scripts/finetune.py --config configs/llama3_8b_lora.yaml

Same as ``automodel-lora finetune ...``; see ``automodel_lora/recipe/sections.py`` for every key.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from automodel_lora.cli import finetune_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune_main(prog="finetune.py"))
