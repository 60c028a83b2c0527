"""Build glue; all metadata lives in setup.cfg.

``configs/`` (the recipes and the quickstart's data) stays at the top of the repository, the one
copy people edit. ``build_py`` copies it into the built package as ``automodel_lora/_recipes/``,
so a wheel / non-editable ``pip install .`` carries the recipes and ``automodel-lora finetune
--config quickstart`` works from any directory. An editable install or a plain checkout has no
copy; ``automodel_lora.cli.recipes_dir()`` then reads ``configs/`` next to the package.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

RECIPES_SRC = "configs"
RECIPES_PKG_DIR = os.path.join("automodel_lora", "_recipes")
RECIPE_SUFFIXES = (".yaml", ".jsonl", ".json")  # .json: the config-only model directories


class build_py_with_recipes(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # editable: the checkout's configs/ is read in place
            return
        here = os.path.dirname(os.path.abspath(__file__))
        src = os.path.join(here, RECIPES_SRC)
        dst = os.path.join(self.build_lib, RECIPES_PKG_DIR)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        for root, _dirs, files in os.walk(src):
            for name in sorted(files):
                if not name.endswith(RECIPE_SUFFIXES):
                    continue
                rel = os.path.relpath(os.path.join(root, name), src)
                os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
                self.copy_file(os.path.join(root, name), os.path.join(dst, rel))


setup(cmdclass={"build_py": build_py_with_recipes})
