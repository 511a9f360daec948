"""The affine compute model against emulated devices whose compute dominates the round.

Four local devices with no link shaping: compute slowdown 1-4x and a fixed cost per compute
step of 0-30 ms (``compute_fixed_ms``, what a call costs before any sample: kernel launches,
interpreter overhead). Each of ``uniform`` and ``latency_balanced`` runs twice: with the affine
model (a fixed cost per step plus a cost per sample, from the probe's two batch sizes, refined
each round) and, for contrast, with the model it replaces (one batch's time divided by its
size, refined per sample), patched in for the run. Reported: mean round time, the latency
model's median error (predicted vs measured round time), and each device's fitted fixed and
per-sample costs against what its emulation imposes::

    python -m bench.compute_fit [--rounds 40] [--quick]

The last line printed is a JSON object (``speedup_balanced_affine_vs_linear``,
``median_error``, ``devices``).
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

from orchestrator.config.manifest import local_device_toml

FLEET = [  # id, compute_slowdown, compute_fixed_ms (per step: a round has two)
    ("dev-a", 1.0, 0.0),
    ("dev-b", 2.0, 5.0),
    ("dev-c", 3.0, 15.0),
    ("dev-d", 4.0, 30.0),
]
BATCH = 64


def manifest(rounds: int, policy: str) -> str:
    text = (
        '[testbed]\nname = "fit"\nlisten = "127.0.0.1:0"\n'
        f"[training]\nrounds = {rounds}\nbatch_size = {BATCH}\neval_every = {rounds}\n"
        f'[data]\npartition = "iid"\n[scheduler]\npolicy = "{policy}"\n'
    )
    return text + "".join(
        local_device_toml(i, f"t-{i}", compute_slowdown=slow, compute_fixed_ms=fixed)
        for i, slow, fixed in FLEET
    )


@contextlib.contextmanager
def linear_model() -> Iterator[None]:
    """The model before the affine fit: the largest probe batch's time over its size, and each
    round's time over its batch (no fixed cost anywhere)."""
    from orchestrator.training import latency

    class LinearFit(latency.AffineFit):
        @classmethod
        def from_points(cls, points: list[tuple[int, float]]) -> latency.AffineFit:
            b, t = max(points)
            return cls(0.0, t / b)

        def observe(self, batch: int, seconds: float) -> None:
            if batch > 0:
                old = self.per_sample_s
                new = seconds / batch
                self.per_sample_s = new if old == 0 else 0.7 * old + 0.3 * new

    saved = latency.AffineFit.from_points
    latency.AffineFit.from_points = LinearFit.from_points  # type: ignore[method-assign]
    try:
        yield
    finally:
        latency.AffineFit.from_points = saved  # type: ignore[method-assign]


def run(rounds: int, policy: str, model: str, work: Path) -> dict[str, Any]:
    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine

    m = parse_manifest(manifest(rounds, policy))
    run_dir = work / f"{policy}-{model}"
    patch = linear_model() if model == "linear" else contextlib.nullcontext()
    with patch:
        status = asyncio.run(Engine(m, run_dir, manifest_to_toml(m), run_id="fit").run())
    recs = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    devices = [json.loads(x) for x in (run_dir / "devices.jsonl").read_text().splitlines()]
    steady = recs[1:]  # round 1 has no backward on the path
    errors = [(r["predicted_s"] - r["round_time_s"]) / r["round_time_s"] for r in steady]
    return {
        "status": status,
        "mean_round_s": statistics.fmean(r["round_time_s"] for r in steady),
        "mean_predicted_s": statistics.fmean(r["predicted_s"] for r in steady),
        "median_abs_error": statistics.median(abs(e) for e in errors),
        "median_error": statistics.median(errors),
        "batches": {i: d["batch"] for i, d in recs[-1]["devices"].items()},
        "probe": {d["device"]: d for d in devices if d.get("source") == "probe"},
        "fit": {d["device"]: d for d in devices if d.get("source") == "fit"},
    }


def device_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each device's fitted costs against its emulation, relative to the unemulated dev-a."""
    rows = []
    for source in ("probe", "fit"):
        base = r[source]["dev-a"]
        for i, slow, fixed in FLEET:
            d = r[source][i]
            rows.append({
                "device": i, "source": source, "slowdown": slow, "emulated_fixed_ms": 2 * fixed,
                "fixed_ms": d["compute_fixed_ms"], "ms_per_sample": d["compute_ms_per_sample"],
                "extra_fixed_ms": round(d["compute_fixed_ms"] - slow * base["compute_fixed_ms"], 2),
                "per_sample_ratio": round(d["compute_ms_per_sample"] / base["compute_ms_per_sample"], 2),
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.compute_fit", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--quick", action="store_true", help="a few rounds, the affine model only")
    args = p.parse_args(argv)
    rounds = 4 if args.quick else args.rounds
    models = ("affine",) if args.quick else ("affine", "linear")
    results: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in ("uniform", "latency_balanced"):
            for model in models:
                r = results[policy, model] = run(rounds, policy, model, Path(tmp))
                print(f"{policy} / {model}: mean round {r['mean_round_s']:.4f} s, predicted "
                      f"{r['mean_predicted_s']:.4f} s, batches {r['batches']}", flush=True)  # fmt: skip
    print(
        "| policy | model | mean round s | mean predicted s | median error | median abs error | batches (a/b/c/d) |"
    )
    print("|---|---|---|---|---|---|---|")
    for (policy, model), r in results.items():
        b = "/".join(str(r["batches"][i]) for i, _, _ in FLEET)
        print(f"| {policy} | {model} | {r['mean_round_s']:.4f} | {r['mean_predicted_s']:.4f} | "
              f"{100 * r['median_error']:+.1f} % | {100 * r['median_abs_error']:.1f} % | {b} |")  # fmt: skip
    rows = device_rows(results["uniform", "affine"])
    print(
        "\n| device | fitted from | slowdown | emulated fixed ms | fitted fixed ms | beyond slowdown × dev-a | ms per sample | per-sample ratio to dev-a |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for d in rows:
        print(f"| {d['device']} | {d['source']} | {d['slowdown']} | {d['emulated_fixed_ms']} | "
              f"{d['fixed_ms']:.2f} | {d['extra_fixed_ms']:.2f} | {d['ms_per_sample']:.4f} | "
              f"{d['per_sample_ratio']} |")  # fmt: skip
    out: dict[str, Any] = {
        "median_error": {f"{p}/{m}": round(r["median_error"], 4) for (p, m), r in results.items()},
        "devices": rows,
    }
    if ("latency_balanced", "linear") in results:
        lin, aff = results["latency_balanced", "linear"], results["latency_balanced", "affine"]
        out["speedup_balanced_affine_vs_linear"] = round(
            lin["mean_round_s"] / aff["mean_round_s"], 3
        )
    print(json.dumps(out))
    return 0 if all(r["status"] == "completed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
