"""Scheduling on a heterogeneous local fleet: uniform vs latency_balanced vs a deadline.

Six emulated devices (compute slowdown 1-4x, uplinks 5-100 Mbps, RTT 2-80 ms) train the digits
with the same total batch under each policy. Reported: mean round time, time to a target
accuracy, final accuracy, the latency model's error, and measured-vs-emulated device figures::

    python -m bench.scheduling [--rounds 60] [--quick]

The last line printed is a JSON object (keys ``speedup_balanced``, ``median_model_error``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    "uniform+deadline": [
        "scheduler.policy=uniform",
        "scheduler.deadline_factor=1.2",
        "scheduler.min_participants=4",
    ],
}


def manifest(
    rounds: int, fleet: list[tuple[str, float, float, float, float]], seed: int = 0
) -> str:
    text = (
        '[testbed]\nname = "sched"\nlisten = "127.0.0.1:0"\n'
        f"[training]\nrounds = {rounds}\nbatch_size = 32\neval_every = 10\nseed = {seed}\n"
        '[data]\npartition = "iid"\n'
    )
    return text + fleet_toml(fleet)


def fleet_toml(fleet: list[tuple[str, float, float, float, float]]) -> str:
    """The ``[[devices]]`` tables of an emulated local fleet (id, slowdown, up, down, RTT)."""
    return "".join(
        local_device_toml(
            i, f"t-{i}", compute_slowdown=slow, uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt
        )
        for i, slow, up, down, rtt in fleet
    )


def run_policy(
    name: str, rounds: int, fleet: list[Any], work: Path, seed: int = 0
) -> dict[str, Any]:
    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine

    m = parse_manifest(manifest(rounds, fleet, seed), overrides=POLICIES[name])
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
        help="also run uniform and latency_balanced with seeds 1..N: accuracy paired by seed",
    )
    args = p.parse_args(argv)
    fleet = FLEET[::2] if args.quick else FLEET
    rounds = 4 if args.quick else args.rounds
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in POLICIES:
            results[name] = run_policy(name, rounds, fleet, Path(tmp))
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
    if not args.quick:
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
        summary.update(_paired(rounds, fleet, args.seeds, uni, bal))
    print(json.dumps(summary))
    return 0


def _paired(
    rounds: int, fleet: list[Any], seeds: int, uni0: dict[str, Any], bal0: dict[str, Any]
) -> dict[str, Any]:
    """Uniform and latency_balanced on seeds 1..N beside seed 0: accuracy paired by seed."""
    per_seed = [(0, uni0, bal0)]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(1, seeds + 1):
            uni = run_policy("uniform", rounds, fleet, Path(tmp), seed)
            bal = run_policy("latency_balanced", rounds, fleet, Path(tmp), seed)
            per_seed.append((seed, uni, bal))
            print(f"seed {seed}: uniform {uni['final_acc']:.4f} ({uni['mean_round_s']:.3f} s), "
                  f"balanced {bal['final_acc']:.4f} ({bal['mean_round_s']:.3f} s)", flush=True)  # fmt: skip
    diffs = [100 * (b["final_acc"] - u["final_acc"]) for _, u, b in per_seed]
    speedups = [u["mean_round_s"] / b["mean_round_s"] for _, u, b in per_seed]
    lines = ["| seed | uniform acc | balanced acc | Δ pts | uniform round s | balanced round s | speedup |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (seed, u, b), d, sp in zip(per_seed, diffs, speedups):
        lines.append(
            f"| {seed} | {u['final_acc']:.4f} | {b['final_acc']:.4f} | {d:+.2f} | "
            f"{u['mean_round_s']:.3f} | {b['mean_round_s']:.3f} | {sp:.2f}× |"
        )
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    lines.append(f"| mean | | | {statistics.fmean(diffs):+.2f} ± {sd:.2f} | | | "
                 f"{statistics.fmean(speedups):.2f}× |")  # fmt: skip
    print("\n".join(lines) + "\n")
    return {
        "seeds": len(per_seed),
        "acc_delta_pts_mean": round(statistics.fmean(diffs), 3),
        "acc_delta_pts_std": round(sd, 3),
        "speedup_mean": round(statistics.fmean(speedups), 3),
    }


if __name__ == "__main__":
    sys.exit(main())
