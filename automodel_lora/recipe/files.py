"""Durable directory writes: write into a temporary sibling, flush, then rename (the rename is the commit).

Names that mark unfinished work, so that the next run can remove them:

- ``.tmp-<name>``: a directory being written; renamed to ``<name>`` when complete.
- ``.trash-<name>``: a directory being deleted; renamed from ``<name>`` before anything in it is
  removed, so a kill mid-delete never leaves a half-deleted ``<name>``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import RunDirError

__all__ = ["fsync_files", "fresh_dir", "replace_dir", "remove_dir", "clean_stale", "atomic_write_text", "writing"]

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def fsync_files(paths: Iterable[Path]) -> None:
    """Flush files to disk before their directory is renamed into place (the rename is the commit)."""
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def fresh_dir(path: Path) -> None:
    """An empty directory at ``path`` (a leftover from a crashed write is removed)."""
    if path.exists():
        remove_dir(path)
    path.mkdir(parents=True)


def _trash_name(path: Path) -> Path:
    return path.with_name(f"{TRASH_PREFIX}{path.name.removeprefix(TMP_PREFIX)}-{time.time_ns()}")


def remove_dir(path: Path) -> None:
    """Delete a directory: one rename to a ``.trash-`` name, then the delete (a kill leaves only trash)."""
    trash = _trash_name(path)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the fully written directory ``tmp`` in place of ``final`` (an old ``final`` goes to the trash first)."""
    trash = None
    if final.exists():
        trash = _trash_name(final)
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def clean_stale(directory: Path) -> list[Path]:
    """Remove the ``.tmp-*`` and ``.trash-*`` directories a killed run left in ``directory``.

    Only safe while holding the directory's lock (another run's ``.tmp-*`` may be in progress).
    Returns what was removed.
    """
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if p.is_dir() and p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a kill leaves the old or the new file, never half)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_HINTS = {
    errno.ENOSPC: "the disk is full: free space there, or set checkpoint.output_dir to a disk with room",
    errno.EDQUOT: "the disk quota is exceeded: free space there, or set checkpoint.output_dir elsewhere",
    errno.EACCES: "the directory is not writable: fix its permissions, or set checkpoint.output_dir elsewhere",
    errno.EPERM: "the directory is not writable: fix its permissions, or set checkpoint.output_dir elsewhere",
    errno.EROFS: "the file system is read-only: set checkpoint.output_dir to a writable directory",
}


def describe_os_error(e: OSError, what: str, directory: Path) -> str:
    """``"could not write <what> in <directory>: [Errno 28] No space left on device (<hint>)"``."""
    hint = _HINTS.get(e.errno)
    reason = f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)
    return f"could not write {what} in {directory}: {reason}" + (f" ({hint})" if hint else "")


@contextlib.contextmanager
def writing(what: str, directory: Path, cleanup: Path | None = None, note: str = "") -> Iterator[None]:
    """Turn an ``OSError`` of the writes inside into a :class:`RunDirError` naming ``directory``.

    ``cleanup``, a partly written temporary directory, is removed first; ``note`` is appended to the
    message (e.g. the last complete checkpoint).
    """
    try:
        yield
    except OSError as e:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise RunDirError(describe_os_error(e, what, directory) + note) from e
