"""Durable directory writes: write into a temporary sibling, flush, then rename (the rename is the commit).

Names that mark unfinished work, so that the next run can remove them:

- ``.tmp-<name>``: a directory being written; renamed to ``<name>`` when complete.
- ``.trash-<name>``: a directory being deleted; renamed from ``<name>`` before anything in it is
  removed, so a kill mid-delete never leaves a half-deleted ``<name>``.

Every byte reaches the disk through a plain ``write`` of this module (``write_bytes``,
``save_tensors``, ``atomic_write_text``): a full disk or a denied write is then an ``OSError``,
which :func:`writing` turns into a ``RunDirError`` naming the directory. ``torch.save`` to a path
(a ``RuntimeError`` from its C++ writer) and safetensors' writer (a ``SafetensorError``) are
recognised by :func:`writing` too, for the writers this package does not own.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import RunDirError

__all__ = [
    "fsync_files",
    "fsync_dir",
    "fresh_dir",
    "replace_dir",
    "remove_dir",
    "clean_stale",
    "write_bytes",
    "save_tensors",
    "atomic_write_text",
    "writing",
]

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def fsync_files(paths: Iterable[Path]) -> None:
    """Flush files to disk before their directory is renamed into place (the rename is the commit)."""
    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename into it is durable only once the directory is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a new ``path`` and flush it to disk; a full disk raises ``OSError`` here."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_tensors(obj, path: Path) -> None:
    """``torch.save`` into memory, then :func:`write_bytes`: torch's own file writer reports a full
    disk as a ``RuntimeError`` without the errno, a plain write as ``OSError(ENOSPC)``."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


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
    """Remove the ``.tmp-*`` and ``.trash-*`` directories and files a killed run left in ``directory``.

    Only safe while holding the directory's lock (another run's ``.tmp-*`` may be in progress).
    Returns what was removed.
    """
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not p.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:  # a file of atomic_write_text
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a kill leaves the old or the new file, never half;
    a failed write leaves the old file and no temporary one)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        write_bytes(tmp, text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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


# Write errors of writers that don't raise OSError: torch.save to a path (C++ PyTorchStreamWriter)
# and safetensors (a Rust io::Error in a SafetensorError). Matched by text: neither carries an errno.
_FOREIGN_IO = [
    (re.compile(r"StorageFull|No space left|code: 28\b"), errno.ENOSPC),
    (re.compile(r"QuotaExceeded|[Qq]uota exceeded|code: 122\b"), errno.EDQUOT),
    (re.compile(r"PermissionDenied|Permission denied|code: 13\b"), errno.EACCES),
    (re.compile(r"ReadOnlyFilesystem|Read-only file system|code: 30\b"), errno.EROFS),
    (re.compile(r"file write failed|PytorchStreamWriter failed|IoError"), None),
]


def as_os_error(e: BaseException) -> OSError | None:
    """The ``OSError`` a write error stands for (itself, or one recognised in a foreign writer's
    ``RuntimeError`` / ``SafetensorError``), or None for any other error."""
    if isinstance(e, OSError):
        return e
    if not isinstance(e, Exception) or not (isinstance(e, RuntimeError) or type(e).__name__ == "SafetensorError"):
        return None
    text = str(e)
    for pattern, code in _FOREIGN_IO:
        if pattern.search(text):
            return OSError(code, os.strerror(code)) if code is not None else OSError(text.strip().splitlines()[0][:200])
    return None


@contextlib.contextmanager
def writing(what: str, directory: Path, cleanup: Path | None = None, note: str = "") -> Iterator[None]:
    """Turn a write error inside (see :func:`as_os_error`) into a :class:`RunDirError` naming ``directory``.

    ``cleanup``, a partly written temporary directory, is removed first; ``note`` is appended to the
    message (e.g. the last complete checkpoint).
    """
    try:
        yield
    except Exception as e:
        os_error = as_os_error(e)
        if os_error is None:
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise RunDirError(describe_os_error(os_error, what, directory) + note) from e
