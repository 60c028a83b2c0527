"""How a run ends when it cannot go on: each error names what went wrong, where, and what to do.

- :class:`ConfigError`: a recipe or its data is invalid (re-exported by ``recipe.config``).
  :class:`RunDirError` / :class:`CheckpointError` subclass it: the command line prints the
  message and exits with code 2 (no traceback), as for a bad recipe key.
- :class:`TrainingInterrupted` (exit ``128 + signal``) and :class:`TrainingStopped` (exit 3) are
  ``SystemExit``: raised once the run's files are in order, they end the process with that code.
"""

from __future__ import annotations

__all__ = ["ConfigError", "RunDirError", "CheckpointError", "TrainingInterrupted", "TrainingStopped", "EXIT_NONFINITE"]

EXIT_NONFINITE = 3


class ConfigError(ValueError):
    """A recipe or its data is invalid: the message names the key or file, the bad value and the fix."""


class RunDirError(ConfigError):
    """The output directory can't be used: locked by another run, holding another run, not writable, full."""


class CheckpointError(ConfigError):
    """A checkpoint can't be resumed from: unreadable, incomplete, unsafe, or not this model's."""


class TrainingInterrupted(SystemExit):
    """Raised after SIGINT/SIGTERM once the checkpoint is saved (exit code 128 + signal)."""


class TrainingStopped(SystemExit):
    """Raised when training can't go on without corrupting the adapter (non-finite loss, gradients or
    parameters); exit code 3. ``message`` says which step and names the last good checkpoint."""

    def __init__(self, message: str, code: int = EXIT_NONFINITE):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message
