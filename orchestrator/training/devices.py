"""The device-group seam: what the round loop asks of its devices, however they are reached.

Over WebSockets in a real run (``orchestrator.fleet.group.SessionGroup``), by direct calls in
``simulate`` (``orchestrator.training.inprocess.InProcessGroup``). Keeping the loop behind this one
protocol is why the two engines produce the same metrics for the same manifest and seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from orchestrator.algorithms.base import Weights

__all__ = ["Batch", "ClientGrad", "DeviceGroup", "ForwardOut", "Weights"]

Batch = dict[str, int]  # device id -> its batch size this round


@dataclass
class ForwardOut:
    acts: np.ndarray
    labels: np.ndarray
    compute_s: float  # as the device measured it
    wait_s: float  # from request to reply, as the orchestrator saw it
    backward_s: float | None = None  # the device's previous backward, for the profiler
    nbytes: int = 0  # activation and label bytes uploaded


@dataclass
class ClientGrad:
    """A held round's upload (GAPSL, client space): the device's client gradient, and what it
    reported of its previous alignment, ``(round, cos(g', g_L))``, when it reported one."""

    grad: np.ndarray
    aligned: tuple[int, float] | None = None


class DeviceGroup(Protocol):
    """The devices of a run, however they are reached. Results are keyed by device id."""

    ids: list[str]

    async def forward(
        self, r: int, batch: Batch, deadline_s: float | None = None, min_participants: int = 1
    ) -> dict[str, ForwardOut]: ...

    async def backward(
        self, r: int, grads: dict[str, np.ndarray], losses: dict[str, float], hold: bool
    ) -> dict[str, ClientGrad]: ...

    async def align(
        self, r: int, ids: list[str], leader: np.ndarray, mode: str, lam: float
    ) -> None: ...

    async def fetch_weights(
        self, r: int, deadline_s: float | None = None, checkpoint: bool = False
    ) -> dict[str, Weights]: ...

    async def set_weights(self, r: int, weights: Weights) -> None: ...
