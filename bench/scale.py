"""Fleet scale: many lightweight agents on real WebSockets against one real orchestrator.

Run ``python -m bench.scale [--agents 256] [--rounds 20] [--quick]``. The orchestrator is the
real :class:`~orchestrator.engine.Engine` in a process of its own (so its RSS and CPU time are
its own), serving a manifest that lists every agent (``launch = "remote"``). The agents are
coroutines, many to a worker process, each with its own connection and device id, speaking
protocol v1 exactly; only their model is small: ``digits_mlp`` cut at ``fc1``, computed with
numpy from the job's weights. The run is repeated for 8, 32, 64, 128 and 256 agents (up to
``--agents``). The last line printed is a JSON object with ``agents``, ``rounds``, ``p99_ms``
(keepalive ping-to-pong latency seen by the agents) and ``rss_mib`` (orchestrator peak RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import protocol
from edge_agent.protocol import decode, encode

SWEEP = (8, 32, 64, 128, 256)
START_TIMEOUT_S = 120.0  # spawning the orchestrator imports torch: slow on a busy machine
AGENT_SAMPLE_EVERY_S = 0.25  # orchestrator RSS / CPU sampling period


def manifest_text(agents: int, rounds: int, ping_interval_s: float) -> str:
    """The orchestrator's manifest: ``agents`` remote devices on the digits, PSL, digits_mlp."""
    text = (
        '[testbed]\nname = "scale"\nlisten = "127.0.0.1:0"\n'
        f"ping_interval_s = {ping_interval_s}\njoin_timeout_s = 600.0\nround_timeout_s = 300.0\n"
        '[training]\nalgorithm = "psl"\ndataset = "digits"\nmodel = "digits_mlp"\ncut = "fc1"\n'
        f"rounds = {rounds}\nbatch_size = 32\neval_every = 10\nseed = 0\n"
        '[data]\npartition = "iid"\n[server]\ndevice = "cpu"\n'
    )
    for k in range(agents):
        text += f'[[devices]]\nid = "lite-{k:03d}"\ntoken = "tok-{k:03d}"\n'
    return text


# --- the lightweight agent ------------------------------------------------------------------


class LiteModel:
    """The client partition of digits_mlp at fc1, relu(x @ W.T + b), with an SGD step in numpy."""

    def __init__(self, weights: dict[str, np.ndarray], lr: float, momentum: float) -> None:
        self.names = list(weights)  # the job's names: eval_result must use the same ones
        w_name = next(n for n in self.names if weights[n].ndim == 2)
        b_name = next(n for n in self.names if weights[n].ndim == 1)
        self.w_name, self.b_name = w_name, b_name
        self.w, self.b = np.array(weights[w_name]), np.array(weights[b_name])
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

    def __init__(self, device_id: str, token: str, data: tuple[np.ndarray, np.ndarray, str]):
        self.id, self.token = device_id, token
        self.x_all, self.y_all, self.fingerprint = data
        self.model: LiteModel | None = None
        self.shard = np.zeros(0, np.int64)
        self.rng = np.random.default_rng()
        self.pending: tuple[int, np.ndarray, np.ndarray] | None = None
        self.applied = 0
        self.latency_ms: list[float] = []
        self.evals = 0
        self.outcome = "no bye"
        self.trace: list[tuple[float, int, float]] = []

    async def run(self, url: str, ping_interval_s: float, telemetry_s: float) -> dict[str, Any]:
        """Connect once and serve until bye; a dropped link ends this agent (it is counted)."""
        from websockets.asyncio.client import connect

        try:
            async with connect(
                url, compression=None, max_size=64 << 20, open_timeout=120,
                ping_interval=ping_interval_s, ping_timeout=60, close_timeout=10,
            ) as ws:  # fmt: skip
                hello = {"hostname": "lite", "platform": sys.platform, "torch_device": "cpu"}
                await ws.send(
                    encode("hello", protocol=protocol.PROTOCOL_VERSION, device_id=self.id,
                           token=self.token, facts=hello)
                )  # fmt: skip
                beat = asyncio.create_task(self._telemetry(ws, telemetry_s))
                try:
                    async for frame in ws:
                        if await self._handle(ws, decode(frame, protocol.ORCHESTRATOR_TYPES)):
                            break
                finally:
                    beat.cancel()
                    await asyncio.gather(beat, return_exceptions=True)
        except Exception as exc:  # reported, not raised: one lost agent must not hide the rest
            self.outcome = f"{type(exc).__name__}: {exc}"
        return {"id": self.id, "applied": self.applied, "evals": self.evals,
                "latency_ms": self.latency_ms, "outcome": self.outcome, "trace": self.trace}  # fmt: skip

    async def _telemetry(self, ws: Any, every_s: float) -> None:
        if every_s <= 0:
            return
        while True:  # as the reference agent does: small live figures every couple of seconds
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
                self.trace.append((time.time(), msg["round"], 1000.0 * ws.latency))
            start = time.perf_counter()
            x, y = self._batch(msg["batch_size"])
            acts = self.model.forward(x)
            self.pending = (msg["round"], x, acts)
            await ws.send(encode("activations", round=msg["round"], x=acts, y=y,
                                 compute_s=time.perf_counter() - start))  # fmt: skip
        elif kind == "gradients":
            if self.model is not None and self.pending and self.pending[0] == msg["round"]:
                _, x, acts = self.pending
                self.model.step(x, acts, msg["grad"])
                self.pending, self.applied = None, msg["round"]
        elif kind == "eval_request":
            assert self.model is not None
            self.evals += 1
            await ws.send(encode("eval_result", round=msg["round"],
                                 weights=self.model.weights(), compute_s=0.0))  # fmt: skip
        elif kind == "set_weights":
            assert self.model is not None
            self.model.w, self.model.b = (np.array(msg["weights"][n]) for n in
                                          (self.model.w_name, self.model.b_name))  # fmt: skip
        elif kind == "echo":
            size = msg.get("reply_bytes")
            payload = msg["payload"] if size is None else np.zeros(size, np.uint8)
            await ws.send(encode("echo_reply", seq=msg["seq"], payload=payload))
        elif kind == "bench":
            assert self.model is not None
            fwd, bwd = self._benchmark(msg["batch_size"], msg["repeats"])
            await ws.send(encode("bench_result", seq=msg["seq"], fwd_s=fwd, bwd_s=bwd))
        elif kind == "skip":
            self.pending = None
        elif kind == "bye":
            if ws.latency > 0:
                self.latency_ms.append(1000.0 * ws.latency)
            self.outcome = "bye"
            await ws.close(protocol.CLOSE_NORMAL, "bye")
            return True
        return False  # "error" needs nothing: the close that follows ends the loop

    def _benchmark(self, batch: int, repeats: int) -> tuple[float, float]:
        assert self.model is not None
        x, _ = self._batch(batch)
        start = time.perf_counter()
        for _ in range(max(repeats, 1)):
            acts = self.model.forward(x)
        mid = time.perf_counter()
        for _ in range(max(repeats, 1)):
            g = np.where(acts > 0, acts, 0.0).astype(np.float32)
            _ = g.T @ x, g.sum(axis=0)
        n = max(repeats, 1)
        return (mid - start) / n, (time.perf_counter() - mid) / n


def _worker(url: str, ids: list[int], ping_interval_s: float, telemetry_s: float,
            conn: Connection) -> None:  # fmt: skip
    """One worker process: load the digits once, run its agents concurrently, report them."""
    from edge_agent.data import labels_fingerprint, load_dataset

    ds = load_dataset("digits")
    x = ds.normalize(ds.x_train).reshape(len(ds.y_train), -1)
    data = (np.ascontiguousarray(x, np.float32), ds.y_train.astype(np.int64),
            labels_fingerprint(ds.y_train))  # fmt: skip
    agents = [LiteAgent(f"lite-{k:03d}", f"tok-{k:03d}", data) for k in ids]

    async def run_all() -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(*(a.run(url, ping_interval_s, telemetry_s) for a in agents))
        )

    conn.send(asyncio.run(run_all()))


# --- the orchestrator process ---------------------------------------------------------------


def _orchestrator(text: str, run_dir: str, conn: Connection) -> None:
    """The real Engine in this process; reports where it listens and CPU time per phase."""
    import resource

    from orchestrator.engine import Engine
    from orchestrator.manifest import manifest_to_toml, parse_manifest
    from orchestrator.rounds import Runner

    def stamp(phase: str) -> None:
        use = resource.getrusage(resource.RUSAGE_SELF)
        conn.send(("phase", phase, time.monotonic(), use.ru_utime + use.ru_stime, use.ru_maxrss))

    profile = Runner.profile

    async def timed_profile(self: Runner) -> None:  # stamps around the probes, same work
        stamp("profile")
        await profile(self)
        stamp("rounds")

    Runner.profile = timed_profile  # type: ignore[method-assign]
    timeline: list[tuple[str, int, float, float]] = []

    def timed(name: str, fn: Any) -> Any:
        async def wrapper(self: Runner, r: int) -> None:
            t0 = time.time()
            await fn(self, r)
            timeline.append((name, r, t0, time.time()))

        return wrapper

    Runner.round = timed("round", Runner.round)  # type: ignore[method-assign]
    Runner.evaluate = timed("evaluate", Runner.evaluate)  # type: ignore[method-assign]
    m = parse_manifest(text)
    engine = Engine(m, Path(run_dir), manifest_to_toml(m), run_id="scale")
    lags: list[tuple[float, float]] = []

    async def serve() -> str:
        monitor = asyncio.create_task(loop_lag(lags))
        try:
            return await engine.run(on_listening=lambda addr: conn.send(("listening", addr)))
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)

    status = asyncio.run(serve())
    stamp("end")
    conn.send(("timeline", timeline, lags))
    conn.send(("done", status))


async def loop_lag(out: list[tuple[float, float]], period_s: float = 0.005) -> None:
    """Record how late this event loop wakes a sleeper: lags over 5 ms, with wall times."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        late = loop.time() - due
        if late > 0.005:
            out.append((time.time(), late))


def run_fleet(agents: int, rounds: int, workers: int, ping_interval_s: float,
              telemetry_s: float, work: Path) -> dict[str, Any]:  # fmt: skip
    """One run: the orchestrator process, ``workers`` agent processes; the figures measured."""
    import psutil

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as real peers would be
    run_dir = work / f"scale-{agents}"
    recv, send = ctx.Pipe(duplex=False)
    orch = ctx.Process(target=_orchestrator, args=(manifest_text(agents, rounds, ping_interval_s),
                                                   str(run_dir), send))  # fmt: skip
    started = time.monotonic()
    orch.start()
    procs: list[Any] = []
    pipes: list[Connection] = []
    phases: dict[str, tuple[float, float, int]] = {}
    status, rss_peak, rss_listen, cpu_listen = "failed", 0, 0, 0.0
    timeline: list[Any] = []
    orch_lags: list[Any] = []
    try:
        if not recv.poll(START_TIMEOUT_S):
            raise RuntimeError(f"the orchestrator did not start (exit code {orch.exitcode})")
        kind, addr = recv.recv()
        watch = psutil.Process(orch.pid)
        rss_listen = watch.memory_info().rss
        cpu_listen = sum(watch.cpu_times()[:2])
        per = math.ceil(agents / workers)
        for w in range(workers):
            ids = list(range(w * per, min(agents, (w + 1) * per)))
            r_end, s_end = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(f"ws://{addr}", ids, ping_interval_s,
                                                  telemetry_s, s_end), daemon=True)  # fmt: skip
            p.start()
            procs.append(p)
            pipes.append(r_end)
        while True:  # sample the orchestrator until it says it is done
            if recv.poll(AGENT_SAMPLE_EVERY_S):
                msg = recv.recv()
                if msg[0] == "phase":
                    phases[msg[1]] = (msg[2], msg[3], msg[4])
                elif msg[0] == "timeline":
                    timeline, orch_lags = msg[1], msg[2]
                elif msg[0] == "done":
                    status = msg[1]
                    break
            elif not orch.is_alive():
                raise RuntimeError(f"the orchestrator died (exit code {orch.exitcode})")
            try:
                rss_peak = max(rss_peak, watch.memory_info().rss)
            except psutil.NoSuchProcess:
                break
        reports = [pipe.recv() for pipe in pipes if pipe.poll(60)]
        results = [r for rep in reports for r in rep[0]]
        worker_lags = [lag for rep in reports for lag in rep[1]]
        worker_cpu = [rep[2] for rep in reports]
    finally:
        for p in [*procs, orch]:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(10)
    wall_s = time.monotonic() - started
    recs = [json.loads(ln) for ln in (run_dir / "rounds.jsonl").read_text().splitlines()]
    steady = [r["round_time_s"] for r in recs[1:]] or [r["round_time_s"] for r in recs]
    lat = sorted(v for r in results for v in r["latency_ms"])
    cpu = {a: phases[b][1] - phases[a][1] for a, b in (("profile", "rounds"), ("rounds", "end"))
           if a in phases and b in phases}  # fmt: skip
    wall = {a: phases[b][0] - phases[a][0] for a, b in (("profile", "rounds"), ("rounds", "end"))
            if a in phases and b in phases}  # fmt: skip
    return {
        "agents": agents,
        "status": status,
        "rounds": len(recs),
        "agents_completed": sum(r["outcome"] == "bye" for r in results),
        "min_rounds_applied": min((r["applied"] for r in results), default=0),
        "failures": sorted({r["outcome"] for r in results if r["outcome"] != "bye"})[:5],
        "mean_round_s": statistics.fmean(steady) if steady else None,
        "median_round_s": statistics.median(steady) if steady else None,
        "latency_samples": len(lat),
        "p50_ms": _quantile(lat, 0.50),
        "p99_ms": _quantile(lat, 0.99),
        "max_ms": lat[-1] if lat else None,
        "rss_listen_mib": rss_listen / 2**20,
        "rss_peak_mib": max(rss_peak, phases.get("end", (0, 0, 0))[2] * 1024) / 2**20,
        "cpu_before_agents_s": cpu_listen,
        "cpu_profile_s": cpu.get("profile"),
        "cpu_rounds_s": cpu.get("rounds"),
        "wall_profile_s": wall.get("profile"),
        "wall_rounds_s": wall.get("rounds"),
        "wall_s": wall_s,
        "worker_cpu_s": worker_cpu,
        "debug": {"timeline": timeline, "orch_lags": orch_lags, "worker_lags": worker_lags,
                  "trace": [t for r in results for t in r["trace"]]},
    }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print a table, then the JSON summary as the last line."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--agents", type=int, default=256, help="agents in the headline run")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4, help="agent processes")
    parser.add_argument("--ping-interval-s", type=float, default=1.0)
    parser.add_argument("--telemetry-s", type=float, default=2.0, help="0: agents send none")
    parser.add_argument("--no-sweep", action="store_true", help="only the headline run")
    parser.add_argument("--quick", action="store_true", help="8 agents, 3 rounds (a smoke run)")
    args = parser.parse_args(argv)
    agents, rounds, workers = args.agents, args.rounds, args.workers
    if args.quick:
        agents, rounds, workers = 8, 3, 2
    sizes = [n for n in SWEEP if n < agents] + [agents]
    if args.quick or args.no_sweep:
        sizes = [agents]
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            row = run_fleet(n, rounds, min(workers, n), args.ping_interval_s, args.telemetry_s,
                            Path(tmp))  # fmt: skip
            rows.append(row)
            print(f"{n} agents: {row['status']}, {row['rounds']} rounds, "
                  f"mean round {_fmt(row['mean_round_s'], '.3f')} s", flush=True)  # fmt: skip
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    print(
        "| agents | status | rounds | mean round s | ping p50 / p99 / max ms | RSS listen / "
        "peak MiB | CPU s: probes / rounds | wall s: probes / rounds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['agents']} | {r['status']} | {r['rounds']} | {_fmt(r['mean_round_s'], '.3f')} "
              f"| {_fmt(r['p50_ms'])} / {_fmt(r['p99_ms'])} / {_fmt(r['max_ms'])} "
              f"| {r['rss_listen_mib']:.0f} / {r['rss_peak_mib']:.0f} "
              f"| {_fmt(r['cpu_profile_s'])} / {_fmt(r['cpu_rounds_s'])} "
              f"| {_fmt(r['wall_profile_s'])} / {_fmt(r['wall_rounds_s'])} |")  # fmt: skip
    head = rows[-1]
    summary = {
        "bench": "scale",
        "agents": head["agents"],
        "rounds": head["rounds"],
        "p99_ms": head["p99_ms"],
        "rss_mib": round(head["rss_peak_mib"], 1),
        "headline": "agents of the largest run, rounds it completed, keepalive ping->pong p99 "
        "(websockets latency seen by the agents), orchestrator peak RSS",
        "quick": args.quick,
        "workers": workers,
        "load_avg_before": [round(v, 2) for v in load],
        "runs": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
