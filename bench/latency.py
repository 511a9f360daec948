"""The latency half of GAPSL's claim: wall-clock time to PSL's final accuracy on a real local fleet.

Six emulated heterogeneous devices (the fleet of ``bench.scheduling``: compute 1-4x, uplinks
5-100 Mbps, RTT 2-80 ms) train the gated ``digits-mlp`` preset (the devices hold 95 % of the
weights, Dirichlet α 0.1) with a real ``run`` — agents, WebSockets, emulated links — under PSL,
SFL, EPSL and GAPSL (tracking and today's default), paired by seed. SFL pays its weight round
trips, GAPSL's client space its client gradient up and its leader down::

    python -m bench.latency [--rounds 150] [--seeds 0,1,2] [--quick]

Reported per method: final accuracy, mean round time, and the wall time to reach the same seed's
PSL final accuracy (as a multiple of PSL's own). The last line printed is a JSON object.
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

from bench.scheduling import FLEET, fleet_toml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
METHODS = {
    "psl": ["training.algorithm=psl"],
    "sfl": ["training.algorithm=sfl", "sfl.avg_every=1"],
    "epsl": ["training.algorithm=epsl", "epsl.phi=0.5"],
    # the first-order GAPSL that was the default until the gated study (docs/results.md)
    "gapsl-fo": ["training.algorithm=gapsl", "gapsl.gda_mode=first_order", "gapsl.prior_tau=0"],
    "gapsl-default": ["training.algorithm=gapsl"],  # today's [gapsl] defaults
}


def manifest(rounds: int, seed: int, fleet: list[Any]) -> str:
    text = (
        '[testbed]\nname = "latency"\nlisten = "127.0.0.1:0"\n'
        f'[training]\nmodel = "digits_mlp"\ncut = "fc2"\nrounds = {rounds}\nbatch_size = 32\n'
        f"eval_every = 10\nseed = {seed}\n"
        '[data]\npartition = "dirichlet"\nalpha = 0.1\n'
    )
    return text + fleet_toml(fleet)


def run_method(name: str, rounds: int, seed: int, fleet: list[Any], work: Path) -> dict[str, Any]:
    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine

    m = parse_manifest(manifest(rounds, seed, fleet), overrides=METHODS[name])
    run_dir = work / f"{name}-s{seed}"
    status = asyncio.run(Engine(m, run_dir, manifest_to_toml(m), run_id=run_dir.name).run())
    rounds_rec = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the clock of training: from the first round's start (the join and the probes excluded)
    t0 = metrics[0]["time_s"] - sum(r["round_time_s"] for r in rounds_rec[: metrics[0]["round"]])
    return {
        "status": status,
        "final_acc": metrics[-1]["acc_mean"],
        "mean_round_s": statistics.fmean(r["round_time_s"] for r in rounds_rec[1:]),
        "curve": [(x["time_s"] - t0, x["acc_mean"]) for x in metrics],
    }


def _time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def _fmt(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{statistics.fmean(values) * scale:.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.latency", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="three devices, few rounds (a smoke run)")
    args = p.parse_args(argv)
    fleet = FLEET[::2] if args.quick else FLEET
    rounds = 10 if args.quick else args.rounds
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:  # one run at a time: the wall clock is what is measured
            for name in METHODS:
                r = results[name, seed] = run_method(name, rounds, seed, fleet, Path(tmp))
                print(f"{name} seed {seed}: {r['status']}, final {r['final_acc']:.3f}, "
                      f"round {r['mean_round_s']:.3f} s", flush=True)  # fmt: skip
    lines = [f"{len(fleet)} emulated devices, {rounds} rounds, seeds {seeds} (paired)", "",
             "| method | final acc % | mean round s | time to PSL final s | × PSL's time | reached |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    summary: dict[str, Any] = {}
    for name in METHODS:
        runs = [(s, results[name, s]) for s in seeds]
        times, ratios = [], []
        for s, r in runs:
            base = results["psl", s]
            target = base["final_acc"]
            mine, theirs = _time_to(r["curve"], target), _time_to(base["curve"], target)
            if mine is not None and theirs:
                times.append(mine)
                ratios.append(mine / theirs)
        lines.append(
            f"| {name} | {_fmt([r['final_acc'] for _, r in runs], scale=100)} "
            f"| {_fmt([r['mean_round_s'] for _, r in runs], 3)} | {_fmt(times)} "
            f"| {_fmt(ratios, 2)} | {len(times)}/{len(runs)} |"
        )
        summary[f"{name}_time_ratio"] = round(statistics.fmean(ratios), 3) if ratios else None
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.quick:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "latency.md").write_text(md)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
