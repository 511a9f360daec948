"""latency_balanced's batches in the in-process engine: accuracy over many paired seeds.

``bench.scheduling`` runs a real emulated fleet, measures round times and confirms; this runs
the same manifests in the reference engine, every device's profile fixed at its emulated
figures, so that the balanced plan is the fleet's without a fleet and twenty seeds take about a
minute. Uniform batches here are the fleet's bit for bit (simulate = run); balanced ones are
planned from the emulated figures rather than measured ones, so they can differ by a sample::

    python -m bench.balance_sim [--setup bench|default] [--seeds 20] [--set KEY=VALUE]...

Per seed: uniform, latency_balanced (as configured), the same with ``step_scaling = "none"``,
the frozen control (uniform, ``client_lr_scale = 0``) and SFL (for the gate, SFL − frozen);
a run ending below 1.5× chance counts as diverged. The last line is a JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.accuracy import DIVERGED_BELOW
from bench.scheduling import FLEET, default_manifest, manifest

# The emulated fleet's unslowed compute per sample, forward and backward each, and fixed cost
# per step (ms): what the probe measures for the digits model here (bench.scheduling's table).
BASE_MS_PER_SAMPLE = 0.0055
BASE_FIXED_MS = (0.3, 0.5)
VARIANTS = {
    "uniform": ["scheduler.policy=uniform"],
    "balanced": ["scheduler.policy=latency_balanced"],
    "balanced, full lr": ["scheduler.policy=latency_balanced", "scheduler.step_scaling=none"],
    "frozen": ["scheduler.policy=uniform", "training.client_lr_scale=0"],
    "sfl": ["scheduler.policy=uniform", "training.algorithm=sfl"],  # for the gate: SFL - frozen
}


@contextlib.contextmanager
def emulated_profiles(fleet: list[tuple[str, float, float, float, float]]) -> Iterator[None]:
    """The in-process group reports the fleet's emulated figures as its measured profiles, and
    rounds leave them as they are (in-process timings are this machine's, not the devices')."""
    from orchestrator.training import inprocess, scheduler
    from orchestrator.training.latency import DeviceProfile

    class Profiled(inprocess.InProcessGroup):
        async def profile(self, act_bytes: int, batch: int) -> dict[str, DeviceProfile]:
            return {
                i: DeviceProfile(
                    fwd_ms_per_sample=BASE_MS_PER_SAMPLE * slow,
                    bwd_ms_per_sample=BASE_MS_PER_SAMPLE * slow,
                    fwd_fixed_ms=BASE_FIXED_MS[0] * slow,
                    bwd_fixed_ms=BASE_FIXED_MS[1] * slow,
                    rtt_ms=rtt,
                    uplink_mbps=up,
                    downlink_mbps=down,
                )
                for i, (_, slow, up, down, rtt) in zip(self.ids, fleet)
            }

    group, observe = inprocess.InProcessGroup, scheduler.Planner.observe
    inprocess.InProcessGroup = Profiled  # type: ignore[misc]
    scheduler.Planner.observe = lambda self, *args: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        inprocess.InProcessGroup = group  # type: ignore[misc]
        scheduler.Planner.observe = observe  # type: ignore[method-assign]


def run(text: str, overrides: list[str]) -> float:
    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine

    m = parse_manifest(text, overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "run"
        status = asyncio.run(Engine(m, d, manifest_to_toml(m), run_id="sim", in_process=True).run())
        assert status == "completed", status
        last = (d / "metrics.jsonl").read_text().splitlines()[-1]
    return float(json.loads(last)["acc_mean"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.balance_sim", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--setup", choices=("bench", "default"), default="bench")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--rounds", type=int, default=60, help="the bench setup's rounds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets")
    args = p.parse_args(argv)
    fleet = FLEET[:4] if args.setup == "default" else FLEET
    rows: list[dict[str, Any]] = []
    with emulated_profiles(fleet):
        for seed in range(args.seeds):
            if args.setup == "default":
                text, base = default_manifest(fleet), [f"training.seed={seed}"]
            else:
                text, base = manifest(args.rounds, fleet, seed), []
            accs = {n: run(text, [*base, *o, *args.sets]) for n, o in VARIANTS.items()}
            rows.append(accs)
            print(f"seed {seed}: " + ", ".join(f"{n} {a:.4f}" for n, a in accs.items()), flush=True)
    summary: dict[str, Any] = {"setup": args.setup, "seeds": args.seeds, "sets": args.sets}
    summary["diverged"] = {n: sum(r[n] < DIVERGED_BELOW for r in rows) for n in VARIANTS}
    gate = [100 * (r["sfl"] - r["frozen"]) for r in rows]
    print(
        f"gate (sfl - frozen): {statistics.fmean(gate):+.2f} points; diverged {summary['diverged']}"
    )
    summary["gate_pts"] = round(statistics.fmean(gate), 3)
    for n in VARIANTS:
        if n == "uniform":
            summary["acc_uniform_mean"] = round(statistics.fmean(r[n] for r in rows), 4)
            continue
        d = [100 * (r[n] - r["uniform"]) for r in rows]
        sd = statistics.stdev(d) if len(d) > 1 else 0.0
        print(f"{n} - uniform: {statistics.fmean(d):+.2f} ± {sd:.2f} points")
        summary[f"delta_pts[{n}]"] = [round(statistics.fmean(d), 3), round(sd, 3)]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
