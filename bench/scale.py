"""Fleet scale: many lightweight agents on real WebSockets against one real orchestrator.

Run ``python -m bench.scale [--agents 1024] [--rounds 20] [--quick]``. The orchestrator is the
real :class:`~orchestrator.engine.Engine` in a process of its own (so its RSS and CPU time are
its own), serving a manifest that lists every agent (``launch = "remote"``). The agents are
coroutines, many to a worker process, each with its own connection and device id, speaking
protocol v1 exactly; only their model is small: ``digits_mlp`` cut at ``fc1``, computed with
numpy from the job's weights. The run is repeated for 8, 64, 256, 512 and 1,024 agents (up to
``--agents``). The last line printed is a JSON object with ``agents``, ``rounds``, ``p99_ms``
(keepalive ping-to-pong latency seen by the agents) and ``rss_mib`` (orchestrator peak RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench._lite_agent import with_lag_probe, worker

SWEEP = (8, 64, 256, 512, 1024)
START_TIMEOUT_S = 120.0  # spawning the orchestrator imports torch: slow on a busy machine
SAMPLE_EVERY_S = 0.25  # orchestrator RSS sampling period


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


# --- the orchestrator process ---------------------------------------------------------------


def _orchestrator(text: str, run_dir: str, profile: bool, threads: int, conn: Connection) -> None:
    """The real Engine in this process; it reports its port, then CPU time and time per phase."""
    import cProfile
    import gc
    import io
    import pstats
    import resource

    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine
    from orchestrator.fleet import group
    from orchestrator.training import loop as rounds

    marks: dict[str, tuple[float, float]] = {}
    spans: dict[str, list[float]] = {}
    profiler = cProfile.Profile()
    gc_started: list[float] = []
    full_gcs: list[tuple[float, float]] = []
    windows: dict[str, list[tuple[float, float]]] = {}  # (start, end) of each timed call

    def gc_clock(phase: str, info: dict[str, Any]) -> None:  # every collection's pause, by gen
        if phase == "start":
            gc_started[:] = [time.perf_counter()]
        elif gc_started:
            took = time.perf_counter() - gc_started[0]
            spans.setdefault(f"gc{info['generation']}", []).append(took)
            if info["generation"] == 2:  # when, to tell the rounds' full collections apart
                full_gcs.append((time.monotonic(), took))

    gc.callbacks.append(gc_clock)

    def mark(name: str) -> None:
        use = resource.getrusage(resource.RUSAGE_SELF)
        marks[name] = (time.monotonic(), use.ru_utime + use.ru_stime)

    def timed(name: str, fn: Any) -> Any:  # the same call, its duration recorded
        async def run_async(*args: Any, **kw: Any) -> Any:
            t0, m0 = time.perf_counter(), time.monotonic()
            out = await fn(*args, **kw)
            spans.setdefault(name, []).append(time.perf_counter() - t0)
            windows.setdefault(name, []).append((m0, time.monotonic()))
            return out

        def run_sync(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            spans.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return run_async if inspect.iscoroutinefunction(fn) else run_sync

    probe_fleet = rounds.Runner.profile

    async def profile_then_mark(self: rounds.Runner) -> None:
        mark("probes")
        await probe_fleet(self)
        mark("rounds")
        if profile:
            profiler.enable()  # the event-loop thread only: the server step runs in a worker

    rounds.Runner.profile = profile_then_mark  # type: ignore[method-assign]
    rounds.Runner.evaluate = timed("evaluate", rounds.Runner.evaluate)  # type: ignore[method-assign]
    group.SessionGroup.fetch_weights = timed("eval_fetch", group.SessionGroup.fetch_weights)  # type: ignore[method-assign]
    rounds.Runner._score = timed("eval_score", rounds.Runner._score)  # type: ignore[method-assign]
    rounds.client_spread = timed("eval_spread", rounds.client_spread)
    m = parse_manifest(text)
    engine = Engine(m, Path(run_dir), manifest_to_toml(m), run_id="scale")
    lags: list[tuple[float, float]] = []

    def listening(addr: str) -> None:
        mark("listening")
        conn.send(("listening", addr))

    run = engine.run(on_listening=listening)
    status = asyncio.run(with_lag_probe(run, lags))
    profiler.disable()
    mark("end")
    text_out = io.StringIO()
    if profile:
        stats = pstats.Stats(profiler, stream=text_out)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"orchestrator|edge_agent", 30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    conn.send(("done", {"status": status, "marks": marks, "spans": spans, "lags": lags,
                        "maxrss": peak, "profile": text_out.getvalue(), "full_gcs": full_gcs,
                        "windows": windows}))  # fmt: skip


def _quantile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else None


def _max_ms(lags: list[Any], marks: dict[str, Any], a: str, b: str) -> float:
    """The longest loop lag that began between marks ``a`` and ``b`` (it ends at ``t``)."""
    return 1e3 * max((lag for t, lag in lags if marks[a][0] <= t - lag <= marks[b][0]), default=0.0)


def _outside(lags: list[Any], windows: list[Any]) -> list[Any]:
    """The lags that began outside every window (start, end)."""
    return [(t, lag) for t, lag in lags if not any(a <= t - lag <= b for a, b in windows)]


def _phase(marks: dict[str, tuple[float, float]], a: str, b: str, k: int) -> float | None:
    return marks[b][k] - marks[a][k] if a in marks and b in marks else None


def run_fleet(agents: int, rounds: int, workers: int, ping_interval_s: float, agent_ping_s: float,
              telemetry_s: float, work: Path, profile: bool = False, threads: int = 0,
              nice: int = 0) -> dict[str, Any]:  # fmt: skip
    """One run: the orchestrator process and ``workers`` agent processes; what was measured."""
    import psutil

    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as real peers would be
    run_dir = work / f"scale-{agents}"
    recv, send = ctx.Pipe(duplex=False)
    text = manifest_text(agents, rounds, ping_interval_s)
    orch = ctx.Process(target=_orchestrator, args=(text, str(run_dir), profile, threads, send))
    started = time.monotonic()
    orch.start()
    procs, pipes, report = [orch], [], None
    rss_peak = 0
    try:
        per = math.ceil(agents / workers)
        for w in range(workers):
            ks = list(range(w * per, min(agents, (w + 1) * per)))
            ours, theirs = ctx.Pipe()
            args = (ks, agent_ping_s, telemetry_s, theirs, nice)
            procs.append(ctx.Process(target=worker, args=args, daemon=True))
            procs[-1].start()
            pipes.append(ours)
        if recv not in multiprocessing.connection.wait([recv, orch.sentinel], START_TIMEOUT_S):
            raise RuntimeError(f"the orchestrator did not start (exit code {orch.exitcode})")
        addr = recv.recv()[1]
        watch = psutil.Process(orch.pid)
        rss_listen = watch.memory_info().rss
        for pipe in pipes:
            pipe.send(f"ws://{addr}")
        while report is None:  # sample the orchestrator's RSS until it says it is done
            if recv.poll(SAMPLE_EVERY_S):
                report = recv.recv()[1]
            elif not orch.is_alive():
                raise RuntimeError(f"the orchestrator died (exit code {orch.exitcode})")
            else:
                rss_peak = max(rss_peak, watch.memory_info().rss)
        fleet = [pipe.recv() for pipe in pipes if pipe.poll(120)]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
                p.join(10)
    recs = [json.loads(ln) for ln in (run_dir / "rounds.jsonl").read_text().splitlines()]
    steady = [r["round_time_s"] for r in recs[1:]] or [r["round_time_s"] for r in recs]
    results = [a for w in fleet for a in w["agents"]]
    lat = [v for a in results for v in a["latency_ms"]]
    worker_lags = [x for w in fleet for x in w["lags"]]
    fresh = [v for a in results for v in a["fresh_ms"]]
    marks, spans = report["marks"], report["spans"]
    cpu_rounds = _phase(marks, "rounds", "end", 1)
    return {
        "agents": agents,
        "status": report["status"],
        "rounds": len(recs),
        "agents_completed": sum(a["outcome"] == "bye" for a in results),
        "min_rounds_applied": min((a["applied"] for a in results), default=0),
        "failures": sorted({a["outcome"] for a in results if a["outcome"] != "bye"})[:5],
        "redials": sum(a["redials"] for a in results),  # dials refused before admission
        "mean_round_s": statistics.fmean(steady),
        "median_round_s": statistics.median(steady),
        "eval_s": statistics.fmean(spans.get("evaluate", [0.0])),
        "eval_parts_s": {k: statistics.fmean(spans[k]) for k in spans if k.startswith("eval_")},
        # The garbage collector's pauses of the orchestrator's process, per generation.
        "gc_pause_max_ms": {k: 1e3 * max(spans[k]) for k in spans if k.startswith("gc")},
        "gc_total_s": {k: sum(spans[k]) for k in spans if k.startswith("gc")},
        "gc2_rounds_max_ms": _max_ms(report["full_gcs"], marks, "rounds", "end"),
        "gc2_rounds": sum(
            marks["rounds"][0] <= t <= marks["end"][0] for t, _ in report["full_gcs"]
        ),
        "latency_samples": len(lat),
        "p50_ms": _quantile(lat, 0.50),
        "p99_ms": _quantile(lat, 0.99),
        "max_ms": max(lat, default=None),
        "fresh_samples": len(fresh),
        "fresh_p99_ms": _quantile(fresh, 0.99),
        # Orchestrator loop lags while the fleet joins (up to the probes) and during rounds.
        "orch_lag_join_max_ms": _max_ms(report["lags"], marks, "listening", "probes"),
        "orch_lag_rounds_max_ms": _max_ms(report["lags"], marks, "rounds", "end"),
        "orch_lag_outside_eval_max_ms": _max_ms(
            _outside(report["lags"], report["windows"].get("evaluate", [])), marks, "rounds", "end"
        ),
        "worker_lag_rounds_max_ms": _max_ms(worker_lags, marks, "rounds", "end"),
        "rss_listen_mib": rss_listen / 2**20,
        "rss_peak_mib": max(rss_peak, report["maxrss"]) / 2**20,
        "cpu_probes_s": _phase(marks, "probes", "rounds", 1),
        "wall_probes_s": _phase(marks, "probes", "rounds", 0),
        "cpu_rounds_s": cpu_rounds,
        "wall_rounds_s": _phase(marks, "rounds", "end", 0),
        "cpu_per_round_s": cpu_rounds / max(len(recs), 1) if cpu_rounds is not None else None,
        "worker_cpu_s": sum(w["cpu_s"] for w in fleet),
        "wall_join_s": _phase(marks, "listening", "probes", 0),  # every agent ready
        "wall_s": time.monotonic() - started,
        "profile": report["profile"],
    }


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print a table, then the JSON summary as the last line."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--agents", type=int, default=1024, help="agents in the headline run")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=4, help="agent processes")
    parser.add_argument(
        "--ping-interval-s", type=float, default=10.0,
        help="the orchestrator's keepalive (testbed.ping_interval_s; default: the manifest's)",
    )  # fmt: skip
    parser.add_argument(
        "--agent-ping-s", type=float, default=1.0,
        help="the agents' keepalive, whose latency is sampled (the agent's default is 10)",
    )  # fmt: skip
    parser.add_argument("--telemetry-s", type=float, default=2.0, help="0: agents send none")
    parser.add_argument(
        "--nice", type=int, default=0,
        help="the agent workers' niceness (0: the orchestrator's priority)",
    )  # fmt: skip
    parser.add_argument("--no-sweep", action="store_true", help="only the headline run")
    parser.add_argument("--profile", action="store_true", help="cProfile the orchestrator")
    parser.add_argument("--torch-threads", type=int, default=0, help="orchestrator's (0: default)")
    parser.add_argument("--quick", action="store_true", help="8 agents, 10 rounds (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:  # a short run: faster agent pings so that some pongs are measured
        args.agents, args.rounds, args.workers, args.agent_ping_s = 8, 10, 2, 0.02
    agents, rounds, workers = args.agents, args.rounds, args.workers
    sizes = [agents] if args.quick or args.no_sweep else [n for n in SWEEP if n < agents] + [agents]
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            row = run_fleet(n, rounds, min(workers, n), args.ping_interval_s, args.agent_ping_s,
                            args.telemetry_s, Path(tmp), args.profile and n == agents,
                            args.torch_threads, args.nice)  # fmt: skip
            rows.append(row)
            print(f"{n} agents: {row['status']}, {row['rounds']} rounds, load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
            if row["profile"]:
                print(row["profile"])
    print("| agents | rounds | mean round s | eval s | ping p50 / p99 / max ms | fresh p99 ms "
          "| orchestrator loop lag max ms: join / rounds / rounds outside evaluation "
          "| full GC max ms in rounds | RSS listening / peak MiB | orchestrator "
          "CPU s per round | worker CPU s | probes wall s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['agents']} | {r['rounds']} | {r['mean_round_s']:.3f} | {r['eval_s']:.2f} "
              f"| {_fmt(r['p50_ms'])} / {_fmt(r['p99_ms'])} / {_fmt(r['max_ms'])} "
              f"| {_fmt(r['fresh_p99_ms'])} "
              f"| {r['orch_lag_join_max_ms']:.0f} / {r['orch_lag_rounds_max_ms']:.0f} "
              f"/ {r['orch_lag_outside_eval_max_ms']:.0f} | {r['gc2_rounds_max_ms']:.0f} "
              f"| {r['rss_listen_mib']:.0f} / {r['rss_peak_mib']:.0f} "
              f"| {_fmt(r['cpu_per_round_s'], '.3f')} | {r['worker_cpu_s']:.1f} "
              f"| {_fmt(r['wall_probes_s'], '.2f')} |")  # fmt: skip
    head = rows[-1]
    summary = {
        "bench": "scale",
        "agents": head["agents"],
        "rounds": head["rounds"],
        "p99_ms": head["p99_ms"],
        "rss_mib": round(head["rss_peak_mib"], 1),
        "headline": "agents and completed rounds of the largest run; p99 of the keepalive "
        "ping->pong latency (websockets) the agents saw, sampled each round; orchestrator peak RSS",
        "quick": args.quick,
        "workers": workers,
        "nice": args.nice,
        "torch_threads": args.torch_threads or "default",
        "load_avg_before": [round(v, 2) for v in load],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "runs": [{k: v for k, v in r.items() if k != "profile"} for r in rows],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
