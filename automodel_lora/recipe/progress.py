"""A dependency-free progress bar and the metrics JSONL writer (rank 0 only)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from .files import writing

__all__ = ["ProgressBar", "MetricsWriter", "format_duration", "say_done"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _si(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class ProgressBar:
    """``step 120/300 [#####.....] 40% | loss 1.234 | lr 1.8e-04 | 12.3k tok/s | MFU 41.2% | 00:20<00:30``

    The MFU field shows only where it is known (a GPU in ``recipe.flops.PEAK_BF16_FLOPS`` and an
    architecture it counts).

    On a terminal the line is redrawn in place every ``every`` steps; otherwise (logs, CI) one
    line is printed every ``every`` steps. ETA uses the mean step time of this session.
    """

    def __init__(
        self, total: int, start: int = 0, every: int = 10, stream: TextIO | None = None, enabled: bool = True, width: int = 20
    ):
        self.total, self.start, self.every = total, start, every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._open_line = False

    def render(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None = None) -> str:
        frac = step / max(1, self.total)
        filled = int(round(frac * self.width))
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        bar = "#" * filled + "." * (self.width - filled)
        n = len(str(self.total))
        mfu_field = f" | MFU {mfu * 100:.1f}%" if mfu is not None else ""
        return (
            f"step {step:>{n}d}/{self.total} [{bar}] {frac * 100:3.0f}% | loss {loss:.4f} | lr {lr:.2e} | "
            f"{_si(tokens_per_s)} tok/s{mfu_field} | {format_duration(elapsed)}<{format_duration(eta)}"
        )

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None = None) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        line = self.render(step, loss, lr, tokens_per_s, mfu)
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._open_line = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def write(self, msg: str) -> None:
        """Print a message without garbling the bar."""
        if not self.enabled:
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class MetricsWriter:
    """Appends one JSON object per line to ``<output_dir>/metrics.jsonl`` (rank 0 only).

    Mid-run, this file is where a filling disk usually shows first: a failed open or write raises
    ``RunDirError`` naming the directory (exit code 2), ``note`` appended (e.g. the last checkpoint).

    Args:
        path: The file.
        enabled: False on ranks other than 0 (nothing is written).
        note: A callable returning text for the end of a write error's message.
    """

    def __init__(self, path: Path, enabled: bool = True, note=None):
        self.path = Path(path)
        self.enabled = enabled
        self.note = note or (lambda: "")
        self._f = None
        if enabled:
            with writing(self.path.name, self.path.parent):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._f is not None:
            with writing(self.path.name, self.path.parent, note=self.note()):
                self._f.write(json.dumps(record) + "\n")
                self._f.flush()

    def close(self) -> None:
        """Close the file. A write error was raised by :meth:`write` already: closing, which flushes
        the failed record again, must not raise it a second time over the first one."""
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:
                pass


def say_done(say, summary: dict, last_loss: float | None, out, adapters: list, save_base: bool) -> None:
    """The run's last lines: losses before and after, where the adapter is (one directory per adapter with
    ``data.adapters``), and how PEFT loads it where the base was saved beside it."""
    if last_loss is not None:
        first, wall = summary["first_loss"], format_duration(summary["wall_time_s"])
        say(f"[done] train loss {first:.4f} -> {last_loss:.4f} in {wall}")
    if summary["val_loss_after"] is not None and summary["val_loss_before"] is not None:
        say(f"[done] val loss {summary['val_loss_before']:.4f} (untrained) -> {summary['val_loss_after']:.4f} (trained)")
    say(f"[done] adapter: {out / 'adapter'}" + (f" (one directory per adapter: {', '.join(adapters)})" if adapters else ""))
    if save_base:
        say(
            "[done] load it with PEFT:\n"
            "  from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
            f"  base = AutoModelForCausalLM.from_pretrained('{out / 'base_model'}')\n"
            f"  model = PeftModel.from_pretrained(base, '{out / 'adapter' / adapters[0] if adapters else out / 'adapter'}')"
        )
