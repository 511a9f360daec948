"""SFL (SplitFed): PSL whose client partitions are FedAvg'd every ``sfl.avg_every`` rounds.

What travels: as in PSL, plus every client partition up and their average down each
``avg_every`` rounds, through the orchestrator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from orchestrator.algorithms.base import Weights
from orchestrator.algorithms.psl import Psl
from orchestrator.config.manifest import Manifest


def fedavg(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of client partitions (SplitFed): sum_i w_i * theta_i / sum_i w_i."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state")
    total = float(sum(weights))
    out = {}
    for name in states[0]:
        acc = torch.zeros_like(states[0][name], dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += state[name].to(torch.float64) * (w / total)
        out[name] = acc.to(states[0][name].dtype)
    return out


class Sfl(Psl):
    name = "sfl"

    def __init__(self, m: Manifest) -> None:
        super().__init__(m)
        self.every = m.sfl.avg_every

    def averages(self, r: int) -> bool:
        return r % self.every == 0

    def average(self, states: Sequence[Weights], weights: Sequence[float]) -> Weights:
        avg = fedavg(
            [{k: torch.from_numpy(np.array(v)) for k, v in s.items()} for s in states], weights
        )
        return {k: v.numpy() for k, v in avg.items()}
