"""The devices of a distributed run, reached through their sessions (a ``SessionGroup``).

Requests go out to every device at once and replies are awaited together; each reply is checked
against what was asked (shape, dtype, finite values) before it reaches the server partition.
Every wait is bounded: each request by ``testbed.round_timeout_s``, an absent device by
``testbed.patience_s``, a round short of its quorum by ``testbed.lost_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np

from edge_agent import protocol
from edge_agent.compress import CompressionError, pack, unpack
from edge_agent.protocol import encode
from orchestrator.errors import FleetError, RunError
from orchestrator.fleet.probe import PROBE_MIN_BATCH, PROBE_MIN_BYTES, probe
from orchestrator.fleet.sessions import DeviceAbsent, DeviceSession, within
from orchestrator.names import DeviceStatus
from orchestrator.training.devices import Batch, ClientGrad, ForwardOut, Weights
from orchestrator.training.latency import DeviceProfile


async def _reap(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the calls still waiting and wait until every one has ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _failure(task: asyncio.Task[Any]) -> BaseException | None:
    """The exception a finished task ended with (None while running, or on success)."""
    if not task.done():
        return None
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()


# Work done for every device in turn gives the event loop back this often, so that a large
# fleet's keepalives and telemetry are read between slices instead of after all of them.
SLICE_DEVICES = 64


async def breathe(k: int) -> None:
    """After the ``k``-th device of a loop (from 0): every SLICE_DEVICES, let the loop run."""
    if k % SLICE_DEVICES == SLICE_DEVICES - 1:
        await asyncio.sleep(0)


class _Arrivals:
    """Tasks as they finish, each handled once: ``asyncio.wait(FIRST_COMPLETED)`` would hook
    and unhook every pending task on each call, quadratic in the fleet over a round."""

    def __init__(self) -> None:
        self._done: list[asyncio.Task[Any]] = []
        self._event = asyncio.Event()

    def watch(self, task: asyncio.Task[Any]) -> None:
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._done.append(task)
        self._event.set()

    def take(self) -> list[asyncio.Task[Any]]:
        """The tasks finished since the last take."""
        self._event.clear()
        done, self._done = self._done, []
        return done

    async def wait(self, timeout_s: float) -> None:
        """Until a task finishes (or has finished since the last take), or ``timeout_s``."""
        if self._done:
            return
        # asyncio.TimeoutError is TimeoutError from Python 3.11 on, another class in 3.10
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            await within(self._event.wait(), timeout_s)


# A round short of scheduler.min_participants logs a "waiting" event this often while it waits.
WAITING_EVENT_EVERY_S = 10.0
# How often a round waiting on its devices looks again at who answered, who is absent and how
# long it has been short of its quorum (the deadline, when sooner, wakes it on time).
QUORUM_CHECK_S = 1.0


class SessionGroup:
    """The round loop's device group over the network (the in-process engine has its own)."""

    def __init__(
        self,
        sessions: list[DeviceSession],
        timeout_s: float,
        num_classes: int,
        compression: str = "none",
        *,
        patience_s: float | None = None,
        lost_timeout_s: float,
        on_event: Callable[..., None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.ids = [s.id for s in sessions]
        self.timeout_s = timeout_s
        self.num_classes = num_classes
        self.compression = compression  # training.compression: the cut-layer codec both ways
        self.patience_s = patience_s  # testbed.patience_s: how long an absent device is awaited
        self.lost_timeout_s = lost_timeout_s  # testbed.lost_timeout_s: short of min_participants
        self.on_event = on_event  # the run's event log

    async def forward(
        self, r: int, batch: Batch, deadline_s: float | None = None, min_participants: int = 1
    ) -> dict[str, ForwardOut]:
        """Activations of the devices in ``batch``; with a deadline, of those that arrive in time.

        Past the deadline the round goes on with whoever has answered (waiting on for at least
        ``min_participants``); the others are told to skip the round and their late replies
        are discarded by round number.
        """

        async def ask(s: DeviceSession, patience: float | None, timeout_s: float) -> ForwardOut:
            t0 = time.perf_counter()
            request = encode("round", round=r, batch_size=batch[s.id])
            msg = await s.call(request, "activations", r, timeout_s, patience_s=patience)
            wait_s = time.perf_counter() - t0
            x, y = _check_activations(s.id, msg, batch[s.id], self.num_classes, self.compression)
            return ForwardOut(
                acts=x, labels=y, compute_s=float(msg["compute_s"]), wait_s=wait_s,
                backward_s=msg.get("backward_s"), nbytes=msg["x"].nbytes + y.nbytes,
            )  # fmt: skip

        sessions = [s for s in self.sessions if s.id in batch]
        need = min(min_participants, len(sessions))
        tasks: dict[asyncio.Task[ForwardOut], DeviceSession] = {}
        arrivals = _Arrivals()
        pending: set[asyncio.Task[ForwardOut]] = set()
        answered: list[asyncio.Task[ForwardOut]] = []
        absent: list[asyncio.Task[ForwardOut]] = []

        def start(s: DeviceSession, patience: float | None, timeout_s: float) -> None:
            task = asyncio.create_task(ask(s, patience, timeout_s))
            tasks[task] = s
            pending.add(task)
            arrivals.watch(task)

        started = time.monotonic()
        short_since: float | None = None  # when fewer than ``need`` could still answer
        noted = 0.0
        try:
            for k, s in enumerate(sessions):
                start(s, self.patience_s, self.timeout_s)
                await breathe(k)  # the requests go out in slices, keepalives answered between
            while True:
                for t in arrivals.take():  # each finished call is looked at once
                    pending.discard(t)
                    problem = _failure(t)
                    if problem is None:
                        answered.append(t)
                    elif isinstance(problem, DeviceAbsent):
                        absent.append(t)
                    else:
                        raise problem  # a timeout or a failed job ends the run
                late = deadline_s is not None and time.monotonic() - started >= deadline_s
                # Once short of the quorum, the devices asked again are not waited for beyond it.
                if not pending or late or short_since is not None:
                    if len(answered) >= need:
                        break
                    # Too few devices for scheduler.min_participants: wait, visibly and for a
                    # bounded time, for absent devices to come back, then ask them again.
                    now = time.monotonic()
                    short_since = short_since or now
                    away = ",".join(tasks[t].id for t in tasks if t not in answered)
                    if now - short_since > self.lost_timeout_s:
                        raise FleetError(
                            f"round {r}: {len(answered)} of the {need} devices needed "
                            f"(scheduler.min_participants) answered; waited "
                            f"{self.lost_timeout_s:.0f} s (testbed.lost_timeout_s) for the "
                            f"absent ones ({away})"
                        )
                    if now - noted >= WAITING_EVENT_EVERY_S and self.on_event is not None:
                        noted = now
                        self.on_event(
                            "waiting",
                            None,
                            {
                                "round": r,
                                "have": len(answered),
                                "need": need,
                                "absent": away,
                                "gives_up_in_s": round(self.lost_timeout_s - (now - short_since)),
                            },
                        )
                    for t in absent:
                        s = tasks.pop(t)
                        # the quorum check above ends the wait first; this bound only backs it up
                        left = self.lost_timeout_s - (now - short_since) + self.timeout_s
                        start(s, None, left)
                    absent = []
                wait_s = QUORUM_CHECK_S
                if deadline_s is not None and not late:
                    wait_s = min(wait_s, deadline_s - (time.monotonic() - started))
                if pending:
                    await arrivals.wait(max(wait_s, 0.0))
            for t, s in tasks.items():
                if _failure(t) is not None or not t.done():
                    s.status = DeviceStatus.STRAGGLING if s.ws is not None else s.status
                    await s.send(encode("skip", round=r))
            return {tasks[t].id: t.result() for t in tasks if t.done() and _failure(t) is None}
        except TimeoutError as exc:
            raise FleetError(str(exc)) from exc
        finally:
            await _reap(tasks)

    async def profile(self, act_bytes: int, batch: int) -> dict[str, DeviceProfile]:
        """Probe every device in turn (one at a time, so they do not compete for the link)."""
        out = {}
        payload = max(act_bytes, PROBE_MIN_BYTES)
        for s in self.sessions:
            out[s.id] = await probe(s, payload, max(batch, PROBE_MIN_BATCH), self.timeout_s)
        return out

    async def backward(
        self, r: int, grads: dict[str, np.ndarray], losses: dict[str, float], hold: bool
    ) -> dict[str, ClientGrad]:
        """Send this round's participants their gradients; in the client space, collect theirs."""
        sessions = [s for s in self.sessions if s.id in grads]
        frames = {}
        for k, s in enumerate(sessions):
            frames[s.id] = encode(
                "gradients", round=r, **_packed_grad(s.id, r, grads[s.id], self.compression),
                loss=losses[s.id], hold=hold or None,
            )  # fmt: skip
            await breathe(k)
        if hold:
            replies = await asyncio.gather(
                *[
                    s.call(
                        frames[s.id], "client_grad", r, self.timeout_s, patience_s=self.patience_s
                    )
                    for s in sessions
                ],
                return_exceptions=True,
            )
            out = {}
            for s, reply in zip(sessions, replies):
                if isinstance(reply, DeviceAbsent):
                    continue  # aligned without it; its partition waits for the next round
                if isinstance(reply, TimeoutError):
                    raise FleetError(str(reply)) from reply
                if isinstance(reply, BaseException):
                    raise reply
                report = reply.get("aligned")
                aligned = None if report is None else (report["round"], float(report["cos"]))
                out[s.id] = ClientGrad(reply["grad"], aligned)
            return out
        for k, s in enumerate(sessions):
            s.last_gradient = (r, frames[s.id])
            await s.send(frames[s.id])  # a device that is away gets it again when it rejoins
            await breathe(k)
        return {}

    async def align(
        self, r: int, ids: list[str], leader: np.ndarray, mode: str, lam: float
    ) -> None:
        frame = encode("align", round=r, leader=leader, mode=mode, lam=lam)
        for s in (s for s in self.sessions if s.id in ids):
            s.last_gradient = (r, frame)  # what completes round r on the device
            await s.send(frame)

    async def fetch_weights(
        self, r: int, deadline_s: float | None = None, checkpoint: bool = False
    ) -> dict[str, Weights]:
        """Every device's client partition; with a deadline, of those that answer in time.

        ``checkpoint``: devices also save a local checkpoint of round ``r`` before answering.
        """
        request = encode("eval_request", round=r, checkpoint=checkpoint or None)
        tasks = {
            asyncio.create_task(
                s.call(request, "eval_result", r, self.timeout_s, patience_s=self.patience_s)
            ): s
            for s in self.sessions
        }
        try:
            done, _ = await asyncio.wait(tasks, timeout=deadline_s)
            out = {}
            for t in done:
                problem = _failure(t)
                if isinstance(problem, DeviceAbsent):
                    continue  # evaluated without it
                if problem is not None:
                    raise problem
                out[tasks[t].id] = dict(t.result()["weights"])
            return {i: out[i] for i in self.ids if i in out}
        except TimeoutError as exc:
            raise FleetError(str(exc)) from exc
        finally:
            await _reap(tasks)

    async def set_weights(self, r: int, weights: Weights) -> None:
        frame = encode("set_weights", round=r, weights=weights)
        for s in self.sessions:
            await s.send(frame)


def _check_activations(
    device: str, msg: protocol.Message, batch: int, num_classes: int, compression: str = "none"
) -> tuple[np.ndarray, np.ndarray]:
    """Activations (unpacked to float32) and labels, checked against the request and the
    job's codec: a device's bug must not poison the server."""
    x, y = msg["x"], msg["y"]
    if x.ndim < 2 or len(x) != len(y) or len(y) != batch:
        raise RunError(
            f"device {device}: activations {x.shape} / labels {y.shape} do not match batch {batch}"
        )
    try:
        x = unpack(x, msg.get("x_scale"), compression)
    except CompressionError as exc:
        raise RunError(f"device {device}: activations: {exc}") from exc
    # int8 times a finite scale is finite; float16 and float32 are checked for NaN and inf.
    if msg["x"].dtype != np.int8 and not np.isfinite(x).all():
        raise RunError(f"device {device}: activations must be finite {msg['x'].dtype}")
    if y.dtype != np.int64 or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
        raise RunError(f"device {device}: labels must be int64 in [0, {num_classes})")
    return x, y


def _packed_grad(device: str, r: int, grad: np.ndarray, compression: str) -> dict[str, Any]:
    """The ``grad`` (and ``grad_scale``) fields of a gradients message, packed as the job says."""
    try:
        data, scale = pack(grad, compression)
    except CompressionError as exc:  # the server partition diverged
        raise RunError(f"device {device}: the gradient of round {r}: {exc}") from exc
    return {"grad": data, "grad_scale": scale}
