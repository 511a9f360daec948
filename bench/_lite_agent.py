"""The lightweight agents of ``bench.scale``: many coroutines to a worker process, each one
device with its own connection and id, speaking protocol v1 exactly; only their model is small
(``digits_mlp`` cut at ``fc1``, computed with numpy from the job's weights).

Also the event-loop lag probe, which the worker processes and the orchestrator process both run.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from edge_agent import protocol
from edge_agent.config import REDIAL_FIRST_S, REDIAL_JITTER, REDIAL_MAX_S
from edge_agent.protocol import decode, encode

LAG_TICK_S = 0.005  # event-loop lag probe period; lags above one tick are recorded


async def loop_lag(out: list[tuple[float, float]]) -> None:
    """How late this event loop wakes a sleeper (blocking code, GC, or no CPU): every lag over
    one tick, as (time.monotonic() at wake-up, seconds late)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_TICK_S
        await asyncio.sleep(LAG_TICK_S)
        if loop.time() - due > LAG_TICK_S:
            out.append((time.monotonic(), loop.time() - due))


async def with_lag_probe(coro: Any, lags: list[tuple[float, float]]) -> Any:
    """Await ``coro`` while :func:`loop_lag` records this event loop's lags into ``lags``."""
    probe = asyncio.create_task(loop_lag(lags))
    try:
        return await coro
    finally:
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)


# --- the lightweight agent ------------------------------------------------------------------


class LiteModel:
    """The client partition of digits_mlp at fc1, relu(x @ W.T + b), with an SGD step in numpy."""

    def __init__(self, weights: dict[str, np.ndarray], lr: float, momentum: float) -> None:
        # The job's names: eval_result must send the same ones, the orchestrator loads strictly.
        self.w_name = next(n for n, v in weights.items() if v.ndim == 2)
        self.b_name = next(n for n, v in weights.items() if v.ndim == 1)
        self.w, self.b = np.array(weights[self.w_name]), np.array(weights[self.b_name])
        self.lr, self.momentum = lr, momentum
        self.vw, self.vb = np.zeros_like(self.w), np.zeros_like(self.b)

    def forward(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.w.T + self.b, 0.0, dtype=np.float32)

    def step(self, x: np.ndarray, acts: np.ndarray, grad: np.ndarray) -> None:
        g = np.where(acts > 0, grad, 0.0).astype(np.float32)  # through the relu
        # torch.optim.SGD without dampening: v = m * v + g; p -= lr * v
        self.vw = self.momentum * self.vw + g.T @ x
        self.vb = self.momentum * self.vb + g.sum(axis=0)
        self.w -= self.lr * self.vw
        self.b -= self.lr * self.vb

    def weights(self) -> dict[str, np.ndarray]:
        return {self.w_name: self.w, self.b_name: self.b}


class LiteAgent:
    """One device: hello, job, ready, then rounds, evaluations and probes until bye."""

    def __init__(self, k: int, data: tuple[np.ndarray, np.ndarray, str]) -> None:
        self.id, self.token = f"lite-{k:03d}", f"tok-{k:03d}"
        self.x_all, self.y_all, self.fingerprint = data
        self.model: LiteModel | None = None
        self.shard = np.zeros(0, np.int64)
        self.rng = np.random.default_rng()
        self.pending: tuple[int, np.ndarray, np.ndarray] | None = None
        self.applied = 0
        self.latency_ms: list[float] = []  # the connection's keepalive latency, once a round
        self.fresh_ms: list[float] = []  # the same, only when a new pong came in since round 1
        self.seen_latency = -1.0
        self.outcome = "no bye"
        self.redials = 0  # dials refused before the job (the pending-connection cap)

    async def run(self, url: str, ping_interval_s: float, telemetry_s: float) -> dict[str, Any]:
        """Serve until bye; a link dropped after the job ends this agent (it is counted).

        Before its job, a refused dial (1013 or a reset: the orchestrator's cap on connections
        that have not said hello yet, met when a whole fleet dials at once) is redialled with
        the reference agent's jittered exponential backoff.
        """
        delay = REDIAL_FIRST_S
        while True:
            try:
                await self._connect(url, ping_interval_s, telemetry_s)
            except (ConnectionClosed, InvalidHandshake, OSError) as exc:
                if self.model is not None:  # admitted and then dropped: that is a failure
                    self.outcome = f"{type(exc).__name__}: {exc}"
                    break
                self.redials += 1
                await asyncio.sleep(delay * random.uniform(REDIAL_JITTER, 1.0))
                delay = min(delay * 2, REDIAL_MAX_S)
                continue
            except Exception as exc:  # reported, not raised: one lost agent must not hide the rest
                self.outcome = f"{type(exc).__name__}: {exc}"
            break
        return {"applied": self.applied, "latency_ms": self.latency_ms, "fresh_ms": self.fresh_ms,
                "outcome": self.outcome, "redials": self.redials}  # fmt: skip

    async def _connect(self, url: str, ping_interval_s: float, telemetry_s: float) -> None:
        from websockets.asyncio.client import connect

        async with connect(
            url, compression=None, max_size=64 << 20, open_timeout=120,
            ping_interval=ping_interval_s, ping_timeout=60, close_timeout=10,
        ) as ws:  # fmt: skip
            facts = {"hostname": "lite", "platform": sys.platform, "torch_device": "cpu"}
            await ws.send(
                encode("hello", protocol=protocol.PROTOCOL_VERSION, device_id=self.id,
                       token=self.token, facts=facts)
            )  # fmt: skip
            beat = asyncio.create_task(self._telemetry(ws, telemetry_s))
            try:
                async for frame in ws:
                    if await self._handle(ws, decode(frame, protocol.ORCHESTRATOR_TYPES)):
                        break
            finally:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)

    async def _telemetry(self, ws: Any, every_s: float) -> None:
        while every_s > 0:  # as the reference agent: small live figures every couple of seconds
            await asyncio.sleep(every_s)
            await ws.send(encode("telemetry", stats={"cpu_percent": 0.0, "mem_percent": 0.0}))

    def _batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.choice(self.shard, size, replace=len(self.shard) < size)
        return self.x_all[idx], self.y_all[idx]

    async def _handle(self, ws: Any, msg: protocol.Message) -> bool:
        kind = msg.type
        if kind == "job":
            start = time.perf_counter()
            job = msg["job"]
            if job["dataset_fingerprint"] != self.fingerprint:
                raise RuntimeError("the job's digits differ from this worker's copy")
            self.shard = np.array(msg["shard"])
            self.rng = np.random.default_rng([int(job["seed"]), int(job["rank"])])
            self.model = LiteModel(dict(msg["weights"]), float(job["lr"]), float(job["momentum"]))
            await ws.send(encode("ready", shard_size=len(self.shard), torch_device="cpu",
                                 load_s=time.perf_counter() - start))  # fmt: skip
        elif kind == "round":
            assert self.model is not None
            if ws.latency > 0:  # 0.0 until the first pong of this connection
                self.latency_ms.append(1000.0 * ws.latency)
            # A pong is handled before any frame sent after it, so a value that changes after
            # round 1 measures a ping answered during training, not one sent before it.
            if msg["round"] > 1 and ws.latency != self.seen_latency:
                self.fresh_ms.append(1000.0 * ws.latency)
            self.seen_latency = ws.latency
            start = time.perf_counter()
            x, y = self._batch(msg["batch_size"])
            acts = self.model.forward(x)
            self.pending = (msg["round"], x, acts)
            await ws.send(encode("activations", round=msg["round"], x=acts, y=y,
                                 compute_s=time.perf_counter() - start))  # fmt: skip
        elif kind == "gradients":
            if self.model is not None and self.pending and self.pending[0] == msg["round"]:
                self.model.step(self.pending[1], self.pending[2], msg["grad"])
                self.pending, self.applied = None, msg["round"]
        elif kind == "eval_request":
            assert self.model is not None
            await ws.send(encode("eval_result", round=msg["round"],
                                 weights=self.model.weights(), compute_s=0.0))  # fmt: skip
        elif kind == "set_weights":
            assert self.model is not None
            self.model.w = np.array(msg["weights"][self.model.w_name])
            self.model.b = np.array(msg["weights"][self.model.b_name])
        elif kind == "echo":
            size = msg.get("reply_bytes")
            payload = msg["payload"] if size is None else np.zeros(size, np.uint8)
            await ws.send(encode("echo_reply", seq=msg["seq"], payload=payload))
        elif kind == "bench":  # the profiler's compute probe: time one forward and one step
            assert self.model is not None
            x, _ = self._batch(msg["batch_size"])
            t0 = time.perf_counter()
            acts = self.model.forward(x)
            t1 = time.perf_counter()
            LiteModel(self.model.weights(), 0.0, 0.0).step(x, acts, acts)
            t2 = time.perf_counter()
            await ws.send(encode("bench_result", seq=msg["seq"], fwd_s=t1 - t0, bwd_s=t2 - t1))
        elif kind == "skip":
            self.pending = None
        elif kind == "bye":
            self.outcome = "bye"
            await ws.close(protocol.CLOSE_NORMAL, "bye")
            return True
        return False  # "error" needs nothing: the close that follows ends the loop


def worker(
    ks: list[int], ping_s: float, telemetry_s: float, conn: Connection, nice: int = 0
) -> None:
    """One worker process: load the digits once, wait for the orchestrator's URL, run its
    agents concurrently, report them. (Started early: its imports overlap the orchestrator's.)
    ``nice`` lowers its scheduling priority: the stand-in devices then take the CPU the
    orchestrator leaves, as devices of their own would not compete with it for one."""
    import resource

    if nice:
        os.nice(nice)

    from edge_agent.data import labels_fingerprint, load_dataset

    ds = load_dataset("digits")
    x = ds.normalize(ds.x_train).reshape(len(ds.y_train), -1)
    data = (np.ascontiguousarray(x, np.float32), ds.y_train, labels_fingerprint(ds.y_train))
    agents = [LiteAgent(k, data) for k in ks]
    lags: list[tuple[float, float]] = []
    # Hundreds of devices share this process (a real agent is one to a process, its heap
    # small): keep the collector's full walks of sklearn's and numpy's objects out of its loop.
    gc.freeze()
    url = conn.recv()

    async def run_all() -> list[dict[str, Any]]:
        runs = asyncio.gather(*(a.run(url, ping_s, telemetry_s) for a in agents))
        return list(await with_lag_probe(runs, lags))

    results = asyncio.run(run_all())
    use = resource.getrusage(resource.RUSAGE_SELF)
    conn.send({"agents": results, "lags": lags, "cpu_s": use.ru_utime + use.ru_stime})
