"""The learning-rate schedule of a run (``training.lr_decay``), one formula for devices and server.

Pure math: the orchestrator's server step and every device's trainer call it with the same round,
so all of them use the same rate in the same round (docs/algorithms.md).
"""

from __future__ import annotations

import math

LR_DECAYS = ("none", "cosine")


def round_lr(lr: float, decay: str, round_: int, rounds: int) -> float:
    """The learning rate of round ``round_`` (1-based) of ``rounds`` under ``training.lr_decay``.

    "cosine" anneals from ``lr`` in round 1 towards 0 after the last round; devices and the
    server use the same value in the same round.
    """
    if decay == "none":
        return lr
    if decay == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (round_ - 1) / max(rounds, 1)))
    raise ValueError(f"unknown lr_decay {decay!r}")
