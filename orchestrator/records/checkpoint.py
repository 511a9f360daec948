"""The orchestrator's checkpoint of a run, for ``gapsl-orchestrator run --resume RUN_DIR``.

Written at every evaluation (the client partitions have just been collected then) and when a
run is interrupted: the server partition and its optimizer, the round reached, the RNG states,
LGI's state, and every device's client partition. Devices keep their own checkpoints of the
same rounds (optimizer and sampler included); the orchestrator's copy of their weights is what a
device without one starts from. ``checkpoint.pt`` in the run directory is replaced atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.errors import GapslError

FILE = "checkpoint.pt"


class CheckpointError(GapslError):
    """A checkpoint that cannot be read or does not belong to the run."""


def save(run_dir: Path, state: dict[str, Any]) -> Path:
    path = Path(run_dir) / FILE
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(run_dir: Path) -> dict[str, Any] | None:
    """The run's checkpoint, or None when it has none (interrupted before its first one)."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    if not isinstance(state, dict) or "round" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this testbed")
    return state


def weights_to_tensors(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}


def tensors_to_weights(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tensors.items()}
