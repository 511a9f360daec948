"""The in-process reference engine's devices: every client partition in this process, no network.

It is the fast path for sweeps and the oracle for the distributed engine: the same round loop
drives the same :class:`~edge_agent.trainer.ClientTrainer` code that runs on a device. Client
work runs on one torch thread, as a local-fleet agent does, so the float results agree; with
``training.compression`` on, activations and gradients take the wire codec's round trip here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from edge_agent.compress import CompressionError, roundtrip
from edge_agent.trainer import ClientTrainer
from orchestrator.config.manifest import Manifest
from orchestrator.errors import RunError
from orchestrator.training.devices import Batch, ClientGrad, ForwardOut, Weights


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class InProcessGroup:
    """A ``DeviceGroup`` of trainers called directly."""

    def __init__(self, m: Manifest, job: Any, ids: list[str]) -> None:
        from orchestrator.training.job import build_job_spec

        ds = job.dataset
        devices = {d.id: d for d in m.devices}
        self.ids = ids
        self.compression = m.training.compression
        self.trainers: dict[str, ClientTrainer] = {}
        with _one_thread():
            for rank, i in enumerate(ids):
                device = devices[i].device if i in devices else "cpu"
                self.trainers[i] = ClientTrainer(
                    build_job_spec(m, job, rank), job.shards[rank], job.client_init,
                    ds.x_train, ds.y_train, ds.normalize, device,
                )  # fmt: skip

    async def forward(
        self, r: int, batch: Batch, deadline_s: float | None = None, min_participants: int = 1
    ) -> dict[str, ForwardOut]:
        # No clocks to race here: every planned device answers (deadlines need a real fleet).
        out = {}
        with _one_thread():
            for i in batch:
                acts, labels, seconds = self.trainers[i].forward(r, batch[i])
                acts = self._wire(acts, f"device {i}: the activations of round {r}")
                out[i] = ForwardOut(acts=acts, labels=labels, compute_s=seconds, wait_s=seconds)
        return out

    async def backward(
        self, r: int, grads: dict[str, np.ndarray], losses: dict[str, float], hold: bool
    ) -> dict[str, ClientGrad]:
        flats = {}
        with _one_thread():
            for i in grads:
                t = self.trainers[i]
                grad = self._wire(grads[i], f"device {i}: the gradient of round {r}")
                flat, _ = t.backward(r, grad, hold)
                if flat is not None:  # what an agent's client_grad carries
                    flats[i] = ClientGrad(flat, t.aligned)
        return flats

    def _wire(self, arr: np.ndarray, what: str) -> np.ndarray:
        """What the receiving side unpacks from the wire (``arr`` itself when uncompressed)."""
        try:
            return roundtrip(arr, self.compression)
        except CompressionError as exc:  # where a real agent or server would refuse to send
            raise RunError(f"{what}: {exc}") from exc

    async def align(
        self, r: int, ids: list[str], leader: np.ndarray, mode: str, lam: float
    ) -> None:
        with _one_thread():
            for i in ids:
                self.trainers[i].align(r, leader, mode, lam)

    async def fetch_weights(
        self, r: int, deadline_s: float | None = None, checkpoint: bool = False
    ) -> dict[str, Weights]:
        return {i: self.trainers[i].weights() for i in self.ids}

    async def set_weights(self, r: int, weights: Weights) -> None:
        for i in self.ids:
            self.trainers[i].set_weights(weights)
