"""Scheduling on a heterogeneous local fleet: uniform vs latency_balanced vs a deadline.

Six emulated devices (compute slowdown 1-4x, uplinks 5-100 Mbps, RTT 2-80 ms) train the digits
with the same total batch under each policy. Reported: mean round time, time to a target
accuracy, final accuracy, the latency model's error, and measured-vs-emulated device figures::

    python -m bench.scheduling [--rounds 60] [--quick] [--seeds N] [--set KEY=VALUE]...
    python -m bench.scheduling --setup default --seeds 4   # the default manifest, emulated

``--setup default`` runs the default ``testbed.toml`` (GAPSL, non-IID, its own rounds) with its
four devices emulated as the first four of the bench's fleet. ``--seeds N`` pairs uniform with
latency_balanced, without ``scheduler.step_scaling`` and without ``scheduler.top_up``, on seeds
0..N.

The last line printed is a JSON object (keys ``speedup_balanced``, ``median_model_error``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.config.manifest import local_device_toml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"

FLEET = [  # id, compute_slowdown, uplink_mbps, downlink_mbps, rtt_ms
    ("dev-a", 1.0, 100.0, 100.0, 2.0),
    ("dev-b", 1.5, 50.0, 100.0, 10.0),
    ("dev-c", 2.0, 20.0, 50.0, 20.0),
    ("dev-d", 2.5, 10.0, 50.0, 40.0),
    ("dev-e", 3.0, 8.0, 20.0, 60.0),
    ("dev-f", 4.0, 5.0, 20.0, 80.0),
]
POLICIES = {
    "uniform": ["scheduler.policy=uniform"],
    "latency_balanced": ["scheduler.policy=latency_balanced"],
    # the same batches, every device at the full lr whatever its batch (before step_scaling)
    "balanced, full lr": ["scheduler.policy=latency_balanced", "scheduler.step_scaling=none"],
    # the same batches, the server learning from the small ones as they are (before top_up)
    "balanced, no replay": ["scheduler.policy=latency_balanced", "scheduler.top_up=none"],
    "uniform+deadline": [
        "scheduler.policy=uniform",
        "scheduler.deadline_factor=1.2",
    ],
}


def manifest(
    rounds: int, fleet: list[tuple[str, float, float, float, float]], seed: int = 0
) -> str:
    """The bench's own manifest: PSL on IID digits, ``rounds`` rounds, the given fleet."""
    text = (
        '[testbed]\nname = "sched"\nlisten = "127.0.0.1:0"\n'
        f"[training]\nrounds = {rounds}\nbatch_size = 32\neval_every = 10\nseed = {seed}\n"
        '[data]\npartition = "iid"\n'
    )
    return text + fleet_toml(fleet)


def default_manifest(fleet: list[tuple[str, float, float, float, float]]) -> str:
    """The default ``testbed.toml`` with its devices replaced by emulated ones, ids kept."""
    text = (ROOT / "testbed.toml").read_text()
    ids = re.findall(r'^id = "([^"]+)"', text, flags=re.M)
    head = text[: text.index("\n[[devices]]")] + "\n"
    return head + fleet_toml([(i, *f[1:]) for i, f in zip(ids, fleet)])


def fleet_toml(fleet: list[tuple[str, float, float, float, float]]) -> str:
    """The ``[[devices]]`` tables of an emulated local fleet (id, slowdown, up, down, RTT)."""
    return "".join(
        local_device_toml(
            i, f"t-{i}", compute_slowdown=slow, uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt
        )
        for i, slow, up, down, rtt in fleet
    )


def run_policy(
    name: str,
    rounds: int,
    fleet: list[Any],
    work: Path,
    seed: int = 0,
    setup: str = "bench",
    sets: tuple[str, ...] = (),
) -> dict[str, Any]:
    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine

    if setup == "default":  # its own rounds, unless --set says otherwise
        text, sets = default_manifest(fleet), (f"training.seed={seed}", *sets)
    else:
        text = manifest(rounds, fleet, seed)
    policy = POLICIES[name]
    if "scheduler.deadline_factor=1.2" in policy:  # most of the fleet: four of six, or all
        policy = [*policy, f"scheduler.min_participants={min(4, len(fleet))}"]
    m = parse_manifest(text, overrides=[*policy, *sets])
    run_dir = work / f"{name}-s{seed}"
    status = asyncio.run(Engine(m, run_dir, manifest_to_toml(m), run_id=name).run())
    rounds_rec = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    probes = [json.loads(x) for x in (run_dir / "devices.jsonl").read_text().splitlines()]
    probes = [p for p in probes if p.get("source") == "probe"]
    steady = rounds_rec[1:]  # round 1 has no backward on the path and warms caches
    errors = [
        abs(r["predicted_s"] - r["round_time_s"]) / r["round_time_s"]
        for r in steady
        if r["predicted_s"]
    ]
    start = metrics[0]["time_s"] - sum(r["round_time_s"] for r in rounds_rec[:10])
    return {
        "status": status,
        "mean_round_s": statistics.fmean(r["round_time_s"] for r in steady),
        "median_model_error": statistics.median(errors) if errors else None,
        "final_acc": metrics[-1]["acc_mean"],
        "time_to_90": next((m["time_s"] - start for m in metrics if m["acc_mean"] >= 0.9), None),
        "stragglers_left_out": sum(len(fleet) - len(r["participants"]) for r in rounds_rec),
        "batches_last_round": {i: d["batch"] for i, d in rounds_rec[-1]["devices"].items()},
        "probes": probes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.scheduling", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="three devices, few rounds (a smoke run)")
    p.add_argument(
        "--seeds",
        type=int,
        default=0,
        metavar="N",
        help="also run the policies but the deadline with seeds 1..N: accuracy paired by seed",
    )
    p.add_argument("--setup", choices=("bench", "default"), default="bench",
                   help="the bench's manifest (PSL, IID) or the default testbed.toml, emulated")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a manifest override for every run (e.g. scheduler.min_batch_fraction=0.5)")  # fmt: skip
    args = p.parse_args(argv)
    if args.setup == "default":
        fleet = FLEET[:4]
    else:
        fleet = FLEET[::2] if args.quick else FLEET
    rounds = 4 if args.quick else args.rounds
    sets = (*args.sets, *(["training.rounds=4"] if args.quick else []))
    run = functools.partial(run_policy, rounds=rounds, fleet=fleet, setup=args.setup, sets=sets)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in POLICIES:
            results[name] = run(name, work=Path(tmp))
            r = results[name]
            print(f"{name}: mean round {r['mean_round_s']:.3f} s, final acc {r['final_acc']:.3f}, "
                  f"model error {r['median_model_error']}", flush=True)  # fmt: skip
    lines = ["| policy | mean round s | time to 90 % s | final acc | median model error | left out |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        err = (
            f"{100 * r['median_model_error']:.1f} %" if r["median_model_error"] is not None else "–"
        )
        t90 = f"{r['time_to_90']:.1f}" if r["time_to_90"] is not None else "–"
        lines.append(
            f"| {name} | {r['mean_round_s']:.3f} | {t90} | {r['final_acc']:.3f} | {err} | {r['stragglers_left_out']} |"
        )
    lines += ["", "| device | emulated slowdown / up / down / RTT | measured compute ms/sample / up / down / RTT |",
              "|---|---|---|"]  # fmt: skip
    for (i, slow, up, down, rtt), probe in zip(
        fleet, sorted(results["uniform"]["probes"], key=lambda x: x["device"])
    ):
        lines.append(
            f"| {i} | {slow}× / {up} / {down} / {rtt} ms | {probe['compute_ms_per_sample']:.4f} / "
            f"{probe['uplink_mbps']} / {probe['downlink_mbps']} / {probe['rtt_ms']} ms |"
        )
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.quick and args.setup == "bench" and not args.sets:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "scheduling.md").write_text(md)
    uni, bal = results["uniform"], results["latency_balanced"]
    summary: dict[str, Any] = {
        "speedup_balanced": round(uni["mean_round_s"] / bal["mean_round_s"], 3),
        "acc_uniform": uni["final_acc"], "acc_balanced": bal["final_acc"],
        "median_model_error": bal["median_model_error"],
        "deadline_left_out": results["uniform+deadline"]["stragglers_left_out"],
    }  # fmt: skip
    if args.seeds:
        summary.update(_paired(run, args.seeds, results))
    print(json.dumps(summary))
    return 0


PAIRED = ("uniform", "latency_balanced", "balanced, full lr", "balanced, no replay")


def _paired(run: Any, seeds: int, seed0: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Uniform and the balanced variants on seeds 1..N beside seed 0: accuracy paired by seed."""
    per_seed = [(0, [seed0[n] for n in PAIRED])]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, seeds + 1):
            rs = [run(n, work=Path(tmp), seed=seed) for n in PAIRED]
            per_seed.append((seed, rs))
            print(f"seed {seed}: " + ", ".join(f"{n} {r['final_acc']:.4f} ({r['mean_round_s']:.3f} s)"
                                             for n, r in zip(PAIRED, rs)), flush=True)  # fmt: skip
    variants = PAIRED[1:]
    head = "| seed | uniform acc | " + " | ".join(f"{n} acc | Δ pts" for n in variants)
    lines = [head + " | uniform round s | balanced round s | speedup |",
             "|---|---|" + "---|---|" * len(variants) + "---|---|---|"]  # fmt: skip
    diffs: dict[str, list[float]] = {n: [] for n in variants}
    speedups = []
    for seed, (u, *rest) in per_seed:
        cells = []
        for n, r in zip(variants, rest):
            diffs[n].append(100 * (r["final_acc"] - u["final_acc"]))
            cells.append(f"{r['final_acc']:.4f} | {diffs[n][-1]:+.2f}")
        b = rest[0]
        speedups.append(u["mean_round_s"] / b["mean_round_s"])
        lines.append(
            f"| {seed} | {u['final_acc']:.4f} | " + " | ".join(cells)
            + f" | {u['mean_round_s']:.3f} | {b['mean_round_s']:.3f} | {speedups[-1]:.2f}× |"
        )  # fmt: skip

    def mean_sd(xs: list[float]) -> tuple[float, float]:
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    stats = {n: mean_sd(diffs[n]) for n in variants}
    cells = [f"**{m:+.2f} ± {sd:.2f}**" if n == variants[0] else f"{m:+.2f} ± {sd:.2f}"
             for n, (m, sd) in stats.items()]  # fmt: skip
    row = ["mean", ""] + [x for c in cells for x in ("", c)]
    row += ["", "", f"**{statistics.fmean(speedups):.2f}×**"]
    lines.append("| " + " | ".join(row) + " |")
    print("\n".join(lines) + "\n")
    (bm, bs), (fm, fs), (nm, ns) = (stats[n] for n in variants)
    return {
        "seeds": len(per_seed),
        "acc_delta_pts_mean": round(bm, 3),
        "acc_delta_pts_std": round(bs, 3),
        "acc_delta_full_lr_pts_mean": round(fm, 3),
        "acc_delta_full_lr_pts_std": round(fs, 3),
        "acc_delta_no_replay_pts_mean": round(nm, 3),
        "acc_delta_no_replay_pts_std": round(ns, 3),
        "speedup_mean": round(statistics.fmean(speedups), 3),
    }


if __name__ == "__main__":
    sys.exit(main())
