"""``summary.json``: how a run ended, its final accuracy and the versions that produced it."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from orchestrator.config.manifest import Manifest


def versions() -> dict[str, str]:
    """The versions a run's figures depend on."""
    import websockets

    from orchestrator import __version__

    return {
        "gapsl_testbed": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "websockets": websockets.__version__,
    }


def run_summary(
    m: Manifest,
    status: str,
    rounds: int,
    checkpoint_round: int | None,
    last_eval: Any,
    wall_s: float,
    devices: Sequence[str],
    run_id: str,
    error: str = "",
) -> dict[str, Any]:
    """The summary's fields; ``last_eval`` is the last evaluation (``acc_mean``, ``acc_min``,
    ``acc_max``) or None; ``error`` is written only when there is one."""
    t = m.training
    summary: dict[str, Any] = {
        "status": status,
        "rounds": rounds,
        "checkpoint_round": checkpoint_round,
        "final_acc_mean": last_eval.acc_mean if last_eval else None,
        "final_acc_min": last_eval.acc_min if last_eval else None,
        "final_acc_max": last_eval.acc_max if last_eval else None,
        "wall_s": round(wall_s, 3),
        "algorithm": t.algorithm,
        "dataset": t.dataset,
        "seed": t.seed,
        "devices": list(devices),
        "run_id": run_id,
        "versions": versions(),
    }
    if error:
        summary["error"] = error
    return summary
