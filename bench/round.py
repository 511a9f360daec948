"""Round time of the distributed engine against the in-process reference engine, and where the
difference goes.

Run ``python -m bench.round [--rounds N] [--repeats K] [--torch-threads T] [--quick]
[--profile] [--devices N]``. For one small manifest and seed (digits, N local CPU agents,
default 4, PSL) the distributed :class:`Engine` (real agent subprocesses over loopback
WebSockets) and the reference engine
(``in_process=True``: the same round loop calling the same trainers directly) run alternately,
K times each, after an unmeasured warm-up run. From ``rounds.jsonl`` (round 1 skipped) it
reports ``ratio_vs_reference`` = mean distributed round time / mean reference round time, and
``critical_path_share``: per round, (slowest device's request-to-reply ``wait_s`` + ``server_s``
+ ``downlink_s``) / ``round_time_s``, median over the rounds of the distributed runs. A phase
clock wrapped around the round loop's calls splits each round further, the kernel's schedstat
tells how long each process waited for a CPU, and a floor measurement times the same frames
through a bare WebSocket peer with no model. ``docs/performance.md`` defines every figure. The
last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._round_floor import floor_ms
from orchestrator.config.manifest import local_device_toml

DEVICES = 4
SEED = 0


def manifest_text(rounds: int, eval_every: int, devices: int = DEVICES) -> str:
    """Digits, ``devices`` local CPU agents, PSL, listening on a free loopback port."""
    text = (
        '[testbed]\nname = "round"\nlisten = "127.0.0.1:0"\n'
        f'[training]\nalgorithm = "psl"\ndataset = "digits"\nrounds = {rounds}\n'
        f"batch_size = 32\neval_every = {eval_every}\nseed = {SEED}\n"
        '[data]\npartition = "iid"\n'
    )
    for k in range(devices):
        text += local_device_toml(f"dev-{k}", f"tok-{k}")
    return text


# --- the phase clock ------------------------------------------------------------------------


class PhaseClock:
    """Times the round loop's calls into its device group and its server step, per round.

    The wrappers call the original methods unchanged; they only read the clock around them.
    """

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, Any]] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from orchestrator.fleet.group import SessionGroup
        from orchestrator.training.inprocess import InProcessGroup
        from orchestrator.training.loop import Runner

        saved: list[tuple[Any, str, Any]] = [
            (cls, "forward", cls.forward) for cls in (SessionGroup, InProcessGroup)
        ]
        saved.append((Runner, "_server_step", Runner._server_step))
        clock = self

        def forward(original: Any) -> Any:
            async def timed(group: Any, r: int, *args: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                out = await original(group, r, *args, **kw)
                clock.rounds.setdefault(r, {})["forward_s"] = time.perf_counter() - t0
                clock.rounds[r]["backward_s"] = {i: f.backward_s for i, f in out.items()}
                return out

            return timed

        def server_step(runner: Any, acts: Any, labels: Any) -> Any:
            t0 = time.perf_counter()
            out = saved[-1][2](runner, acts, labels)
            clock.rounds.setdefault(runner.state.round, {})["server_thread_s"] = (
                time.perf_counter() - t0
            )
            return out

        for cls, _, original in saved[:2]:
            cls.forward = forward(original)  # type: ignore[method-assign,assignment]
        Runner._server_step = server_step  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            for cls, name, original in saved:
                setattr(cls, name, original)


def critical_path_s(rec: dict[str, Any]) -> float:
    """Slowest device's request-to-reply wait + server step + gradient send, of one round."""
    slowest = max(d["wait_s"] for d in rec["devices"].values())
    return float(slowest + rec["server_s"] + rec["downlink_s"])


def breakdown(recs: list[dict[str, Any]], clock: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Median milliseconds of each part of a round, over the given rounds (parts the phase clock
    did not see are left out)."""
    rows: dict[str, list[float]] = {}
    for rec in recs:
        c = clock.get(rec["round"], {})
        dev = max(rec["devices"].values(), key=lambda d: d["wait_s"])
        parts = {
            "round": rec["round_time_s"],
            "slowest_wait": dev["wait_s"],
            "slowest_compute": dev["compute_s"],
            "slowest_link_and_overhead": dev["wait_s"] - dev["compute_s"],
            "wait_spread": dev["wait_s"] - min(d["wait_s"] for d in rec["devices"].values()),
            "server": rec["server_s"],
            "downlink": rec["downlink_s"],
            "critical_path": critical_path_s(rec),
        }
        if "forward_s" in c:
            parts["forward"] = c["forward_s"]
            parts["forward_minus_slowest_wait"] = c["forward_s"] - dev["wait_s"]
            parts["rest_of_round"] = (
                rec["round_time_s"] - c["forward_s"] - rec["server_s"] - rec["downlink_s"]
            )
        if "server_thread_s" in c:
            parts["server_in_thread"] = c["server_thread_s"]
        backs = [b for b in c.get("backward_s", {}).values() if b is not None]
        if backs:
            parts["device_backward_max"] = max(backs)
        for k, v in parts.items():
            rows.setdefault(k, []).append(v)
    return {k: 1e3 * statistics.median(v) for k, v in rows.items()}


def sched_ms(pid: int) -> tuple[float, float]:
    """(on-CPU, waiting for a CPU) milliseconds of every thread of a process, from the kernel's
    /proc/PID/task/*/schedstat; (nan, nan) where that is not available."""
    on = wait = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                fields = f.read().split()
            on, wait = on + int(fields[0]) / 1e6, wait + int(fields[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return float("nan"), float("nan")
    return on, wait


def run_engine(text: str, work: Path, name: str, in_process: bool, profile: bool = False) -> Any:
    """One run of the manifest. Returns its steady rounds, the phase clock, the scheduler's
    figures over the rounds (per process: on-CPU and run-queue milliseconds per round) and,
    with ``profile``, cProfile's table of this process's event-loop thread over the rounds."""
    import cProfile
    import io
    import pstats

    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine
    from orchestrator.training.loop import Runner

    m = parse_manifest(text)
    clock, profiler = PhaseClock(), cProfile.Profile()
    probe, train = Runner.profile, Runner.train
    engine = Engine(m, work / name, manifest_to_toml(m), run_id=name, in_process=in_process)
    marks: list[dict[str, tuple[float, float]]] = []

    def mark() -> None:
        pids = {"orchestrator": os.getpid()}
        if engine.fleet is not None:
            pids.update({i: p.pid for i, p in engine.fleet.procs.items()})
        marks.append({i: sched_ms(pid) for i, pid in pids.items()})

    async def probe_then_mark(runner: Runner) -> None:  # the rounds start after the probes
        await probe(runner)
        mark()
        if profile:
            profiler.enable()

    async def train_then_mark(runner: Runner) -> None:
        await train(runner)
        profiler.disable()
        mark()

    Runner.profile = probe_then_mark  # type: ignore[method-assign,assignment]
    Runner.train = train_then_mark  # type: ignore[method-assign,assignment]
    try:
        with clock.installed():
            status = asyncio.run(engine.run())
    finally:
        profiler.disable()
        Runner.profile = probe  # type: ignore[method-assign,assignment]
        Runner.train = train  # type: ignore[method-assign,assignment]
    if status != "completed":
        raise RuntimeError(f"{name}: the run ended {status}; see {work / name}")
    recs = [json.loads(ln) for ln in (work / name / "rounds.jsonl").read_text().splitlines()]
    out = io.StringIO()
    if profile:
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
    n = len(recs)
    sched = {
        i: [(marks[1][i][k] - marks[0][i][k]) / n for k in (0, 1)]
        for i in marks[0]
        if len(marks) == 2 and i in marks[1]
    }
    # Round 1 has no backward before it and warms caches: left out.
    return {"steady": recs[1:], "clock": clock.rounds, "sched": sched, "profile": out.getvalue()}


# --- main ----------------------------------------------------------------------------------

_PARTS = (
    ("round", "round_time_s"),
    ("forward", "group.forward: requests out, every reply in"),
    ("slowest_wait", "  slowest device's wait_s (request to reply)"),
    ("slowest_compute", "    its forward compute_s"),
    ("slowest_link_and_overhead", "    the rest: transfer, codec, asyncio, thread hops"),
    ("wait_spread", "  slowest wait minus fastest wait"),
    ("forward_minus_slowest_wait", "  forward minus the slowest wait"),
    ("server", "server_s (to_thread included)"),
    ("server_in_thread", "  the server step itself"),
    ("downlink", "downlink_s (gradients out; reference: client backward)"),
    ("rest_of_round", "rest: plan, copies to tensors, bookkeeping"),
    ("critical_path", "critical path = slowest wait + server + downlink"),
    ("device_backward_max", "devices' previous backward, max (reported by agents)"),
)


def main(argv: list[str] | None = None) -> int:
    """Run both engines, print the breakdown table, then the JSON summary as the last line."""
    parser = argparse.ArgumentParser(prog="python -m bench.round", description=__doc__)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each engine, alternating")
    parser.add_argument("--quick", action="store_true", help="4 rounds, one run each, no floor")
    parser.add_argument(
        "--devices", type=int, default=DEVICES,
        help=f"local agents (default {DEVICES}; at most the cores to keep CPU contention out)",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="cProfile one distributed run")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="torch threads here (0: torch's default)"
    )
    args = parser.parse_args(argv)
    rounds, repeats = (4, 1) if args.quick else (max(args.rounds, 2), max(args.repeats, 1))
    devices = max(args.devices, 1)
    text = manifest_text(rounds, eval_every=rounds if args.quick else 10, devices=devices)
    import torch

    if args.torch_threads > 0:  # the orchestrator's server step and the reference's everything
        torch.set_num_threads(args.torch_threads)
    load = os.getloadavg()
    recs: dict[str, list[dict[str, Any]]] = {"distributed": [], "reference": []}
    clocks: dict[str, dict[int, dict[str, Any]]] = {"distributed": {}, "reference": {}}
    per_run: dict[str, list[float]] = {"distributed": [], "reference": []}
    sched: dict[str, dict[str, list[list[float]]]] = {"distributed": {}, "reference": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.quick:  # one-time costs of this process (imports, thread pools) go here
            run_engine(manifest_text(5, 5), Path(tmp), "warm-up", True)
        for k in range(repeats):
            for name in ("reference", "distributed"):
                started = time.monotonic()
                res = run_engine(text, Path(tmp), f"{name}-{k}", name == "reference")
                steady, clock = res["steady"], res["clock"]
                for who, figures in res["sched"].items():
                    role = "orchestrator" if who == "orchestrator" else "agent"
                    sched[name].setdefault(role, []).append(figures)
                # Rounds of every repeat pooled: key the clock by (repeat, round) as round + k*R.
                for rec in steady:
                    recs[name].append({**rec, "round": rec["round"] + k * rounds})
                clocks[name].update({r + k * rounds: v for r, v in clock.items()})
                per_run[name].append(statistics.fmean(r["round_time_s"] for r in steady))
                print(f"{name} run {k + 1}: mean round {1e3 * per_run[name][-1]:.2f} ms, "
                      f"{time.monotonic() - started:.1f} s in all, load average "
                      f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
        profile_text = ""
        if args.profile:
            profile_text = run_engine(text, Path(tmp), "profiled", False, profile=True)["profile"]
    batch = int(recs["distributed"][0]["devices"]["dev-0"]["batch"])
    mean = {n: statistics.fmean(r["round_time_s"] for r in recs[n]) for n in recs}
    ratio = mean["distributed"] / mean["reference"]
    median = {n: statistics.median(r["round_time_s"] for r in recs[n]) for n in recs}
    # Per round, per process (agents averaged): on-CPU and run-queue wait, in ms.
    cpu = {n: {role: [statistics.fmean(f[k] for f in v) for k in (0, 1)]
               for role, v in sched[n].items()} for n in sched}  # fmt: skip
    share = statistics.median(critical_path_s(r) / r["round_time_s"] for r in recs["distributed"])
    ref_share = statistics.median(critical_path_s(r) / r["round_time_s"] for r in recs["reference"])
    parts = {n: breakdown(recs[n], clocks[n]) for n in recs}
    print(f"\n{devices} devices ({os.cpu_count()} cores), digits, PSL, {rounds} rounds x "
          f"{repeats} runs of each engine; "
          f"medians over rounds 2..{rounds}, in ms\n")  # fmt: skip
    print("| part | distributed | reference |\n|---|---|---|")
    for key, label in _PARTS:
        cells = [f"{parts[n][key]:.2f}" if key in parts[n] else "–" for n in parts]
        print(f"| {label} | {' | '.join(cells)} |")
    for n, roles in cpu.items():
        for role, (on, wait) in roles.items():
            print(f"{n}, per round, {role} process: {on:.2f} ms on a CPU, {wait:.2f} ms "
                  "runnable but waiting for one (kernel schedstat)")  # fmt: skip
    floor: dict[str, float] = {}
    if not args.quick:
        from orchestrator.config.manifest import parse_manifest
        from orchestrator.training.job import prepare_job

        width = prepare_job(parse_manifest(text)).act_bytes_per_sample // 4
        floor = floor_ms((batch, width))
        print(f"\nfloor, same frames through a bare peer (median ms): {floor}")
    if profile_text:
        print(profile_text)
    summary = {
        "bench": "round",
        "ratio_vs_reference": round(ratio, 4),
        "critical_path_share": round(share, 4),
        "headline": "mean steady round time, distributed / in-process reference; median over "
        "distributed rounds of (slowest wait_s + server_s + downlink_s) / round_time_s",
        "reference_critical_path_share": round(ref_share, 4),
        "ratio_of_medians": round(median["distributed"] / median["reference"], 4),
        "mean_round_ms": {n: round(1e3 * v, 3) for n, v in mean.items()},
        "median_round_ms": {n: round(1e3 * v, 3) for n, v in median.items()},
        "sched_ms_per_round": {
            n: {
                role: {"on_cpu": round(v[0], 3), "runqueue": round(v[1], 3)}
                for role, v in roles.items()
            }
            for n, roles in cpu.items()
        },
        "per_run_mean_round_ms": {n: [round(1e3 * v, 3) for v in per_run[n]] for n in per_run},
        "median_parts_ms": {n: {k: round(v, 3) for k, v in p.items()} for n, p in parts.items()},
        "floor_ms": {k: round(v, 3) for k, v in floor.items()},
        "torch_threads": torch.get_num_threads(),
        "devices": devices,
        "cores": os.cpu_count(),
        "rounds": rounds,
        "repeats": repeats,
        "quick": args.quick,
        "load_avg_before": [round(v, 2) for v in load],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
