"""Durable directory writes: write into a temporary sibling, flush, then rename (the rename is the commit)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def fsync_files(paths: Iterable[Path]) -> None:
    """Flush files to disk before their directory is renamed into place (the rename is the commit)."""
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def fresh_dir(path: Path) -> None:
    """An empty directory at ``path`` (a leftover from a crashed write is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the fully written directory ``tmp`` in place of ``final`` (one rename; an old ``final`` is removed)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
