"""The run directory: one writer at a time, and another run's files are never overwritten.

``<output_dir>/.lock`` is held with ``fcntl.flock`` (by rank 0 under torchrun) for the whole run; it
holds the PID and host of its holder. The kernel drops the lock when that process dies, so a killed
run never leaves a stale lock. A second run on the same directory fails at once, naming the holder.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import RunDirError
from .files import describe_os_error

__all__ = ["RunLock", "move_aside"]

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<output_dir>/.lock``.

    Args:
        output_dir: The run directory (created if missing).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.dir = Path(output_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock or raise.

        Raises:
            RunDirError: another process holds it (the message names its PID), or the directory
                can't be created or written.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(describe_os_error(e, "the lock file", self.dir)) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 256).decode("utf-8", "replace").strip() or "unknown PID"
            os.close(fd)
            raise RunDirError(
                f"`checkpoint.output_dir`: {self.dir} is in use by another run ({holder}); wait for it to "
                "finish or stop it, or set checkpoint.output_dir to another directory"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError as e:
            os.close(fd)
            raise RunDirError(describe_os_error(e, "the lock file", self.dir)) from e
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a run that just opened it)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def move_aside(output_dir: Path) -> Path:
    """Rename ``output_dir`` to ``<output_dir>.old-YYYYmmdd-HHMMSS[-n]`` (one rename, nothing deleted)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output_dir.with_name(f"{output_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = output_dir.with_name(f"{output_dir.name}.old-{stamp}-{n}")
        n += 1
    try:
        os.replace(output_dir, target)
    except OSError as e:
        raise RunDirError(describe_os_error(e, f"{output_dir.name} (moving it aside)", output_dir.parent)) from e
    return target
