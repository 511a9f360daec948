"""Floods against a training orchestrator: held unauthenticated connections, wrong-token hellos.

Run ``python -m bench.flood [--held 2000] [--hello-rate 200] [--rounds 300]``. A real local-fleet
run (the real :class:`~orchestrator.engine.Engine` in a process of its own, four local agents
with emulated compute and links) is measured twice: quiet, then with a flood from another
process that starts when the first round does and lasts until the run ends. The flood keeps
``--held`` WebSocket connections open that never say hello (each one closed is opened again a
second later) and sends wrong-token hellos for a listed device at ``--hello-rate`` per second.
It dials from ``--source`` (default 127.0.0.2, which Linux routes on the loopback as it is), as
an attacker's address differs from the devices'; ``--source ""`` dials from the agents' own
address, which a listed device's admission exempts from per-source penalties.
The last line printed is a JSON object with ``ratio`` (mean round time under the flood over
quiet), ``rss_mib`` (the orchestrator's peak RSS, quiet and flooded) and what the flood saw.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 180.0  # spawning the orchestrator imports torch: slow on a busy machine
REOPEN_S = 1.0  # a held connection that was closed is opened again after this long
HELLO_WORKERS = 16  # concurrent wrong-token dialers sharing the hello rate


DEFAULT_SOURCE = "127.0.0.2"  # the flood's own loopback address: the agents dial from 127.0.0.1


def manifest_text(rounds: int, max_pending: int, extra: str = "") -> str:
    """Four local agents, emulated so that a round is mostly device time, as on a real fleet."""
    from orchestrator.config.manifest import local_device_toml

    text = (
        '[testbed]\nname = "flood"\nlisten = "127.0.0.1:0"\n'
        f"max_pending_connections = {max_pending}\n{extra}"
        f'[training]\ndataset = "digits"\nrounds = {rounds}\neval_every = {rounds}\n'
        'batch_size = 32\n[data]\npartition = "iid"\n'
    )
    for k, slow in enumerate((2.0, 3.0, 4.0, 6.0)):
        text += local_device_toml(
            f"dev-{k}", f"tok-{k}", compute_slowdown=slow, rtt_ms=20.0, uplink_mbps=20.0
        )
    return text


# --- the flood --------------------------------------------------------------------------------


class FloodStats:
    """What the flooding peer saw: close codes of held connections and of wrong-token hellos."""

    def __init__(self) -> None:
        self.held_codes: collections.Counter[str] = collections.Counter()
        self.hello_codes: collections.Counter[str] = collections.Counter()
        self.held_open = 0
        self.held_peak = 0
        self.opened = 0
        self.hellos = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "held_codes": dict(self.held_codes),
            "hello_codes": dict(self.hello_codes),
            "held_peak": self.held_peak,
            "opened": self.opened,
            "hellos": self.hellos,
        }


def _code(exc: BaseException | None, ws: Any) -> str:
    """The close code a connection ended with, or why there was none ("reset", "refused",
    "timeout")."""
    code = getattr(ws, "close_code", None) if ws is not None else None
    if code is not None:
        return str(code)
    if isinstance(exc, ConnectionRefusedError):  # nobody listens: the run is over
        return "refused"
    return "timeout" if isinstance(exc, TimeoutError) else "reset"


def dial(url: str, source: str | None) -> Any:
    """websockets' ``connect`` to ``url`` from ``source`` (an address of this machine; None:
    whichever the kernel picks), without keepalive: the flood's connections only sit there."""
    from websockets.asyncio.client import connect

    local: dict[str, Any] = {"local_addr": (source, 0)} if source else {}
    return asyncio.wait_for(connect(url, open_timeout=10, ping_interval=None, **local), 15)


async def hold(url: str, stats: FloodStats, stop: asyncio.Event, source: str | None = None) -> None:
    """Keep one connection open without a hello; when it is closed, open another a bit later."""
    while not stop.is_set():
        ws = None
        exc: BaseException | None = None
        try:
            ws = await dial(url, source)
            stats.opened += 1
            stats.held_open += 1
            stats.held_peak = max(stats.held_peak, stats.held_open)
            try:
                stop_wait = asyncio.ensure_future(stop.wait())
                closed = asyncio.ensure_future(ws.wait_closed())
                await asyncio.wait({stop_wait, closed}, return_when=asyncio.FIRST_COMPLETED)
                stop_wait.cancel()
                closed.cancel()
            finally:
                stats.held_open -= 1
            if stop.is_set():
                await ws.close()
                return
        except Exception as e:  # refused, reset, timed out: counted by what it was
            exc = e
        stats.held_codes[_code(exc, ws)] += 1
        try:
            await asyncio.wait_for(stop.wait(), REOPEN_S)
        except asyncio.TimeoutError:
            pass


async def wrong_hellos(
    url: str,
    device: str,
    rate: float,
    stats: FloodStats,
    stop: asyncio.Event,
    source: str | None = None,
) -> None:
    """One dialer: connect, send a hello with a wrong token, read the close; at ``rate`` per s."""
    from edge_agent.protocol import PROTOCOL_VERSION, encode

    frame = encode(
        "hello", protocol=PROTOCOL_VERSION, device_id=device, token="wrong", facts={}, resume=None
    )
    gap = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        ws = None
        exc: BaseException | None = None
        try:
            ws = await dial(url, source)
            await ws.send(frame)
            stats.hellos += 1
            await asyncio.wait_for(ws.wait_closed(), 10)
        except Exception as e:
            exc = e
        stats.hello_codes[_code(exc, ws)] += 1
        next_at = max(next_at + gap, time.monotonic())
        try:
            await asyncio.wait_for(stop.wait(), max(next_at - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            pass


async def flood(
    url: str,
    device: str,
    held: int,
    hello_rate: float,
    stop: asyncio.Event,
    source: str | None = None,
) -> FloodStats:
    """Run both floods from ``source`` until ``stop`` is set; every task ends with it."""
    stats = FloodStats()
    workers = min(HELLO_WORKERS, max(1, int(hello_rate)))
    async with asyncio.TaskGroup() as tg:
        for _ in range(held):
            tg.create_task(hold(url, stats, stop, source))
        if hello_rate > 0:
            for _ in range(workers):
                rate = hello_rate / workers
                tg.create_task(wrong_hellos(url, device, rate, stats, stop, source))
    return stats


def _flood_process(
    url: str, held: int, hello_rate: float, nice: int, source: str, conn: Connection
) -> None:
    """A flooding peer in its own process, until told to stop (or a bound of 30 minutes)."""
    import os

    from orchestrator.fleet.gate import raise_fd_limit

    if nice:  # an attacker's CPU is its own: here it shares the fleet's cores
        os.nice(nice)
    raise_fd_limit()  # a peer holding 2,000 connections needs more than the usual 1,024 files

    async def main() -> FloodStats:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def told() -> None:  # any message from the parent: stop
            loop.remove_reader(conn.fileno())
            stop.set()

        loop.add_reader(conn.fileno(), told)
        loop.call_later(1800.0, stop.set)
        return await flood(url, "dev-0", held, hello_rate, stop, source or None)

    import resource

    stats = asyncio.run(main()).as_dict()
    use = resource.getrusage(resource.RUSAGE_SELF)
    stats["cpu_s"] = round(use.ru_utime + use.ru_stime, 2)
    conn.send(stats)


# --- the orchestrator -------------------------------------------------------------------------


def _orchestrator(text: str, run_dir: str, conn: Connection) -> None:
    """The real Engine in this process; it reports its port, the first round, and its peak RSS."""
    import resource

    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine

    m = parse_manifest(text)
    engine = Engine(m, Path(run_dir), manifest_to_toml(m), run_id="flood")

    def seen(name: str, rec: dict[str, Any]) -> None:
        if name == "events" and rec.get("event") == "round_started" and rec.get("round") == 1:
            conn.send(("training", None))

    engine.records.subscribe(seen)
    status = asyncio.run(engine.run(on_listening=lambda a: conn.send(("listening", a))))
    use = resource.getrusage(resource.RUSAGE_SELF)
    agents = resource.getrusage(resource.RUSAGE_CHILDREN)  # the local agents, stopped by now
    conn.send(("done", {"status": status, "maxrss": use.ru_maxrss * 1024,  # KiB on Linux
                        "cpu_s": round(use.ru_utime + use.ru_stime, 2),
                        "agents_cpu_s": round(agents.ru_utime + agents.ru_stime, 2)}))  # fmt: skip


def run_once(
    text: str,
    run_dir: Path,
    held: int,
    hello_rate: float,
    nice: int = 0,
    source: str = DEFAULT_SOURCE,
) -> dict[str, Any]:
    """One run of ``text``; with ``held`` or ``hello_rate``, flooded from its first round."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_orchestrator, args=(text, str(run_dir), child))
    proc.start()
    flooder = None
    to_flood = None
    addr = ""
    try:
        silent_since = time.monotonic()
        while True:
            if not parent.poll(1.0):
                if not proc.is_alive():
                    raise RuntimeError(f"the orchestrator exited with code {proc.exitcode}")
                if time.monotonic() - silent_since > START_TIMEOUT_S * 4:
                    raise RuntimeError("the orchestrator went silent")
                continue
            silent_since = time.monotonic()
            kind, value = parent.recv()
            if kind == "listening":
                addr = value
            elif kind == "training" and (held or hello_rate):
                to_flood, flood_end = ctx.Pipe()
                flooder = ctx.Process(
                    target=_flood_process,
                    args=(f"ws://{addr}", held, hello_rate, nice, source, flood_end),
                )
                flooder.start()
            elif kind == "done":
                result = dict(value)
                break
        if flooder is not None and to_flood is not None:
            to_flood.send("stop")
            result["flood"] = to_flood.recv() if to_flood.poll(120) else None
            flooder.join(30)
    finally:
        for p in (proc, flooder):
            if p is not None and p.is_alive():
                p.kill()
        proc.join(30)
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    times = [r["round_time_s"] for r in rounds if r["round"] > 1]  # round 1 has no backward
    if not times:
        summary = json.loads((run_dir / "summary.json").read_text())
        raise RuntimeError(f"the run made no rounds: {summary.get('error')}")
    refused = [e for e in events if e["event"] == "refused"]
    penalised = [e for e in events if e["event"] == "penalised"]
    result.update(
        rounds=len(rounds),
        mean_round_s=statistics.fmean(times),
        median_round_s=statistics.median(times),
        refused_lines=len(refused),
        refusals_counted=sum(int(e.get("count", 1)) for e in refused),
        reset_penalised=sum(int(e.get("count", 1)) for e in refused if _penalised_reset(e)),
        penalised_lines=len(penalised),
        penalties=sum(int(e.get("count", 1)) for e in penalised),
        penalty_s=[e["penalty_s"] for e in penalised if "penalty_s" in e],
        fd_limit=[e for e in events if e["event"] == "fd_limit"],
    )
    return result


def _penalised_reset(event: dict[str, Any]) -> bool:
    return str(event.get("reason", "")).endswith("source penalised")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held", type=int, default=2000, help="unauthenticated connections held")
    ap.add_argument("--hello-rate", type=float, default=200.0, help="wrong-token hellos per s")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--max-pending", type=int, default=256, help="max_pending_connections")
    ap.add_argument(
        "--flood-nice", type=int, default=0, help="run the flooding process at this niceness"
    )
    ap.add_argument(
        "--source",
        default=DEFAULT_SOURCE,
        help='the address the flood dials from; "" = the agents\' own (exempt from penalties)',
    )
    ap.add_argument(
        "--penalty-after", type=int, default=None, help="testbed.penalty_after (0 = off)"
    )
    args = ap.parse_args(argv)
    extra = f"penalty_after = {args.penalty_after}\n" if args.penalty_after is not None else ""
    text = manifest_text(args.rounds, args.max_pending, extra)
    with tempfile.TemporaryDirectory(prefix="gapsl-flood-") as tmp:
        quiet = run_once(text, Path(tmp) / "quiet", 0, 0.0)
        flooded = run_once(
            text, Path(tmp) / "flood", args.held, args.hello_rate, args.flood_nice, args.source
        )
    mib = 1 << 20
    print(
        "| run | status | rounds | mean round s | median round s | peak RSS MiB | refused lines |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in (("quiet", quiet), ("flood", flooded)):
        print(
            f"| {name} | {r['status']} | {r['rounds']} | {r['mean_round_s']:.4f} | "
            f"{r['median_round_s']:.4f} | {r['maxrss'] / mib:.0f} | {r['refused_lines']} |"
        )
    f = flooded.get("flood") or {}
    print(f"flood: {json.dumps(f)}; refusals in the log: {flooded['refusals_counted']}")
    out = {
        "ratio": round(flooded["mean_round_s"] / quiet["mean_round_s"], 3),
        "median_ratio": round(flooded["median_round_s"] / quiet["median_round_s"], 3),
        "rss_mib": {"quiet": round(quiet["maxrss"] / mib), "flood": round(flooded["maxrss"] / mib)},
        "orchestrator_cpu_s": {"quiet": quiet["cpu_s"], "flood": flooded["cpu_s"]},
        "agents_cpu_s": {"quiet": quiet["agents_cpu_s"], "flood": flooded["agents_cpu_s"]},
        "status": [quiet["status"], flooded["status"]],
        "refused_lines": flooded["refused_lines"],
        "refusals_counted": flooded["refusals_counted"],
        "reset_penalised": flooded["reset_penalised"],
        "penalised_lines": flooded["penalised_lines"],
        "penalties": flooded["penalties"],
        "penalty_s": flooded["penalty_s"],
        "source": args.source,
        "penalty_after": args.penalty_after,
        "flood": f,
        "held": args.held,
        "hello_rate": args.hello_rate,
        "flood_nice": args.flood_nice,
    }
    print(json.dumps(out))
    return 0 if quiet["status"] == flooded["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
