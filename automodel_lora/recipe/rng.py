"""Random-number-generator state as plain tensors, so a checkpoint loads with ``weights_only=True``.

``capture_rng`` -> ``{"torch": uint8 tensor, "cuda": uint8 tensor, "python": int64 tensor,
"python_gauss": float | None, "numpy": int64 tensor, "numpy_pos": int, ...}``: no pickled Python
objects, only tensors, numbers and None.
"""

from __future__ import annotations

import random

import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng(device: torch.device) -> dict:
    """This process's RNG states (python, torch CPU, the CUDA device's, numpy's global) as tensors."""
    version, words, gauss = random.getstate()  # (3, 625 uint32 words, cached gauss or None)
    state = {
        "python_version": version,
        "python": torch.tensor(words, dtype=torch.int64),
        "python_gauss": gauss,
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    if kind == "MT19937":
        state.update(numpy=torch.from_numpy(keys.astype(np.int64)), numpy_pos=int(pos))
        state.update(numpy_has_gauss=int(has_gauss), numpy_gauss=float(cached))
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """Set the RNG states captured by :func:`capture_rng`.

    Raises:
        KeyError, TypeError, ValueError, RuntimeError: ``state`` is not what ``capture_rng`` wrote.
    """
    words = tuple(int(w) for w in state["python"].tolist())
    random.setstate((int(state["python_version"]), words, state["python_gauss"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        keys = state["numpy"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"]))
