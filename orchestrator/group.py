"""The devices of a distributed run, reached through their sessions (a ``DeviceGroup``).

Requests go out to every device at once and replies are awaited together; each reply is checked
against what was asked (shape, dtype, finite values) before it reaches the server partition.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import numpy as np

from edge_agent import protocol
from edge_agent.protocol import encode

from .errors import FleetError, RunError
from .rounds import ForwardOut, Weights
from .sessions import DeviceSession


class SessionGroup:
    def __init__(self, sessions: list[DeviceSession], timeout_s: float, num_classes: int) -> None:
        self.sessions = sessions
        self.ids = [s.id for s in sessions]
        self.timeout_s = timeout_s
        self.num_classes = num_classes

    async def _all(self, calls: list[Awaitable[protocol.Message]]) -> list[protocol.Message]:
        try:
            return list(await asyncio.gather(*calls))
        except TimeoutError as exc:
            raise FleetError(str(exc)) from exc

    async def forward(self, r: int, batch: dict[str, int]) -> dict[str, ForwardOut]:
        async def ask(s: DeviceSession) -> ForwardOut:
            t0 = time.perf_counter()
            msg = await s.call(
                encode("round", round=r, batch_size=batch[s.id]), "activations", r, self.timeout_s
            )
            wait_s = time.perf_counter() - t0
            x, y = _check_activations(s.id, msg, batch[s.id], self.num_classes)
            return ForwardOut(acts=x, labels=y, compute_s=float(msg["compute_s"]), wait_s=wait_s)

        try:
            outs = await asyncio.gather(*(ask(s) for s in self.sessions))
        except TimeoutError as exc:
            raise FleetError(str(exc)) from exc
        return dict(zip(self.ids, outs))

    async def backward(
        self, r: int, grads: dict[str, np.ndarray], losses: dict[str, float], hold: bool
    ) -> dict[str, np.ndarray]:
        frames = {
            s.id: encode(
                "gradients", round=r, grad=grads[s.id], loss=losses[s.id], hold=hold or None
            )
            for s in self.sessions
        }
        if hold:
            replies = await self._all(
                [s.call(frames[s.id], "client_grad", r, self.timeout_s) for s in self.sessions]
            )
            return {s.id: msg["grad"] for s, msg in zip(self.sessions, replies)}
        for s in self.sessions:
            s.last_gradient = (r, frames[s.id])
            await s.send(frames[s.id])  # a device that is away gets it again when it rejoins
        return {}

    async def align(self, r: int, leader: np.ndarray, mode: str, lam: float) -> None:
        frame = encode("align", round=r, leader=leader, mode=mode, lam=lam)
        for s in self.sessions:
            s.last_gradient = (r, frame)  # what completes round r on the device
            await s.send(frame)

    async def fetch_weights(self, r: int) -> dict[str, Weights]:
        request = encode("eval_request", round=r)
        replies = await self._all(
            [s.call(request, "eval_result", r, self.timeout_s) for s in self.sessions]
        )
        return {s.id: dict(msg["weights"]) for s, msg in zip(self.sessions, replies)}

    async def set_weights(self, r: int, weights: Weights) -> None:
        frame = encode("set_weights", round=r, weights=weights)
        for s in self.sessions:
            await s.send(frame)


def _check_activations(
    device: str, msg: protocol.Message, batch: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Activations and labels must match the request; a device's bug must not poison the server."""
    x, y = msg["x"], msg["y"]
    if x.ndim < 2 or len(x) != len(y) or len(y) != batch:
        raise RunError(
            f"device {device}: activations {x.shape} / labels {y.shape} do not match batch {batch}"
        )
    if x.dtype != np.float32 or not np.isfinite(x).all():
        raise RunError(f"device {device}: activations must be finite float32")
    if y.dtype != np.int64 or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise RunError(f"device {device}: labels must be int64 in [0, {num_classes})")
    return x, y
