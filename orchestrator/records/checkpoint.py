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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from orchestrator.errors import GapslError

if TYPE_CHECKING:
    from orchestrator.training.loop import Runner

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


def runner_state(runner: Runner, r: int) -> dict[str, Any]:
    """What the round loop needs to carry on after round ``r``, as tensors and plain values."""
    tracker = runner.tracker
    return {
        "round": r,
        "run_id": runner.run_id,
        "server": {k: v.detach().cpu() for k, v in runner.job.server.state_dict().items()},
        "optimizer": runner.optimizer.state_dict(),
        "clients": {i: weights_to_tensors(w) for i, w in runner._client_weights.items()},
        "leader_ema": None if tracker.ema is None else tracker.ema.detach().cpu(),
        "last_leaders": None if runner._last_leaders is None else sorted(runner._last_leaders),
        "churn": list(runner._churn),
        "participation_rng": runner._participation_rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "server_s_per_sample": runner.server_s_per_sample,
    }


def restore_runner(runner: Runner, state: dict[str, Any]) -> None:
    """Put a :func:`runner_state` back: server, optimizer, LGI, RNGs, client partitions."""
    runner.job.server.load_state_dict(state["server"], strict=True)
    runner.optimizer.load_state_dict(state["optimizer"])
    ema = state["leader_ema"]
    runner.tracker.ema = None if ema is None else ema.to(runner.job.server_device)
    last = state["last_leaders"]
    runner._last_leaders = None if last is None else set(last)
    runner._churn.extend(state["churn"])
    runner._participation_rng.bit_generator.state = dict(state["participation_rng"])
    torch.set_rng_state(state["torch_rng"])
    runner.server_s_per_sample = float(state["server_s_per_sample"])
    runner._client_weights = {i: tensors_to_weights(w) for i, w in state["clients"].items()}
