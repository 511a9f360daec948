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
from .profiler import DeviceProfile, link_from_samples
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

    async def forward(
        self,
        r: int,
        batch: dict[str, int],
        deadline_s: float | None = None,
        min_participants: int = 1,
    ) -> dict[str, ForwardOut]:
        """Activations of the devices in ``batch``; with a deadline, of those that arrive in time.

        Past the deadline the round goes on with whoever has answered (waiting on for at least
        ``min_participants``); the others are told to skip the round and their late replies
        are discarded by round number.
        """

        async def ask(s: DeviceSession) -> ForwardOut:
            t0 = time.perf_counter()
            request = encode("round", round=r, batch_size=batch[s.id])
            msg = await s.call(request, "activations", r, self.timeout_s)
            wait_s = time.perf_counter() - t0
            x, y = _check_activations(s.id, msg, batch[s.id], self.num_classes)
            return ForwardOut(
                acts=x, labels=y, compute_s=float(msg["compute_s"]), wait_s=wait_s,
                backward_s=msg.get("backward_s"), nbytes=x.nbytes + y.nbytes,
            )  # fmt: skip

        sessions = [s for s in self.sessions if s.id in batch]
        tasks = {asyncio.create_task(ask(s)): s for s in sessions}
        try:
            done: set[asyncio.Task[ForwardOut]] = set()
            pending = set(tasks)
            if deadline_s is not None:
                done, pending = await asyncio.wait(pending, timeout=deadline_s)
            need = len(sessions) if deadline_s is None else min(min_participants, len(sessions))
            while pending and len(done) < need:
                more, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                done |= more
            for task in pending:
                task.cancel()
            late = [tasks[t] for t in pending]
            for s in late:
                s.status = "straggling"
                await s.send(encode("skip", round=r))
            return {tasks[t].id: t.result() for t in tasks if t in done}
        except TimeoutError as exc:
            raise FleetError(str(exc)) from exc
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def profile(self, act_bytes: int, batch: int) -> dict[str, DeviceProfile]:
        """Probe every device in turn (one at a time, so they do not compete for the link)."""
        out = {}
        # Payloads large enough that transfer time dominates timer and scheduling noise.
        payload = max(act_bytes, PROBE_MIN_BYTES)
        for s in self.sessions:
            out[s.id] = await probe(s, payload, max(batch, PROBE_MIN_BATCH), self.timeout_s)
        return out

    async def backward(
        self, r: int, grads: dict[str, np.ndarray], losses: dict[str, float], hold: bool
    ) -> dict[str, np.ndarray]:
        """Send this round's participants their gradients; in the client space, collect theirs."""
        sessions = [s for s in self.sessions if s.id in grads]
        frames = {
            s.id: encode(
                "gradients", round=r, grad=grads[s.id], loss=losses[s.id], hold=hold or None
            )
            for s in sessions
        }
        if hold:
            replies = await self._all(
                [s.call(frames[s.id], "client_grad", r, self.timeout_s) for s in sessions]
            )
            return {s.id: msg["grad"] for s, msg in zip(sessions, replies)}
        for s in sessions:
            s.last_gradient = (r, frames[s.id])
            await s.send(frames[s.id])  # a device that is away gets it again when it rejoins
        return {}

    async def align(
        self, r: int, ids: list[str], leader: np.ndarray, mode: str, lam: float
    ) -> None:
        frame = encode("align", round=r, leader=leader, mode=mode, lam=lam)
        for s in (s for s in self.sessions if s.id in ids):
            s.last_gradient = (r, frame)  # what completes round r on the device
            await s.send(frame)

    async def fetch_weights(self, r: int, deadline_s: float | None = None) -> dict[str, Weights]:
        """Every device's client partition; with a deadline, of those that answer in time."""
        request = encode("eval_request", round=r)
        tasks = {
            asyncio.create_task(s.call(request, "eval_result", r, self.timeout_s)): s
            for s in self.sessions
        }
        try:
            done, _ = await asyncio.wait(tasks, timeout=deadline_s)
            return {tasks[t].id: dict(t.result()["weights"]) for t in tasks if t in done}
        except TimeoutError as exc:
            raise FleetError(str(exc)) from exc
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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


async def probe(s: DeviceSession, act_bytes: int, batch: int, timeout_s: float) -> DeviceProfile:
    """RTT by echo, then activation-sized payloads down and up, then a compute benchmark."""
    seq = 0

    async def echo(payload: int, reply: int | None) -> float:
        nonlocal seq
        seq += 1
        frame = encode("echo", seq=seq, payload=np.zeros(payload, np.uint8), reply_bytes=reply)
        t0 = time.perf_counter()
        await s.call(frame, "echo_reply", seq, timeout_s, key="seq")
        return time.perf_counter() - t0

    await echo(16, None)  # warm-up: first frames pay for buffers and code paths
    rtts = [await echo(16, None) for _ in range(PROBE_RTT_SAMPLES)]
    down = [(act_bytes, await echo(act_bytes, 0)) for _ in range(PROBE_RATE_SAMPLES)]
    up = [(act_bytes, await echo(0, act_bytes)) for _ in range(PROBE_RATE_SAMPLES)]
    rtt_ms, jitter_ms, down_mbps, up_mbps = link_from_samples(rtts, down, up)
    seq += 1
    reply = await s.call(
        encode("bench", seq=seq, batch_size=batch, repeats=5),
        "bench_result",
        seq,
        timeout_s,
        key="seq",
    )
    return DeviceProfile(
        fwd_ms_per_sample=1000.0 * float(reply["fwd_s"]) / batch,
        bwd_ms_per_sample=1000.0 * float(reply["bwd_s"]) / batch,
        rtt_ms=rtt_ms, jitter_ms=jitter_ms, uplink_mbps=up_mbps, downlink_mbps=down_mbps,
    )  # fmt: skip


PROBE_MIN_BYTES = 512 * 1024
PROBE_MIN_BATCH = 64
PROBE_RTT_SAMPLES = 7
PROBE_RATE_SAMPLES = 3
