"""Activation compression: what fp16 and int8 cut-layer tensors save on the wire, and cost in accuracy.

Every run is the in-process reference engine on the default manifest (``testbed.toml``: four
devices, batch 32, 150 rounds) at Dirichlet alpha 0.1, once per codec and seed, paired by seed;
``simulate`` applies the wire codec's exact round trip, so the accuracies are those of a fleet.
Bytes are the sizes of the real protocol frames for the model's activation shape; codec times
are best-of-N pack + unpack of one batch in this process::

    python -m bench.compression                      # digits, and Fashion-MNIST when present
    python -m bench.compression --datasets digits --seeds 0,1,2 --jobs 2
    python -m bench.compression --quick              # a smoke run, seconds

The last line printed is a JSON object; its headline ``int8_bytes_ratio`` is the int8 frames'
bytes (activations up + gradients down) over the uncompressed ones, on the bundled digits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import compress

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "testbed.toml"
MODES = compress.MODES
ALGORITHMS = {
    "psl": ["training.algorithm=psl"],
    # the manifest's GAPSL defaults: client space, first-order GDA, lambda 1, rho 0.5, EMA 0.9
    "gapsl": ["training.algorithm=gapsl"],
}


def _data_root() -> Path:
    return Path(os.environ.get("GAPSL_DATA_DIR", ROOT.parent / "shared" / "data"))


def dataset_overrides(dataset: str, rounds: int | None) -> list[str]:
    """Manifest overrides of one dataset on top of testbed.toml (and alpha 0.1)."""
    out = ["data.alpha=0.1"]
    if dataset == "fashion_mnist":
        # the CNN's evaluation on 10,000 images dominates on two cores: 2,000 of them, less often
        out += [
            "training.dataset=fashion_mnist",
            f"data.dir={_data_root() / 'fashion_mnist'}",
            "training.eval_every=25",
            "data.test_limit=2000",
        ]
    if rounds is not None:
        out += [f"training.rounds={rounds}", f"training.eval_every={max(1, rounds // 2)}"]
    return out


def run_one(job: tuple[str, str, str, int, int | None, str]) -> dict[str, Any]:
    """One simulate run; returns its final accuracies and wall time."""
    dataset, algorithm, mode, seed, rounds, out = job
    import torch

    from orchestrator.config.manifest import load_manifest, manifest_to_toml
    from orchestrator.engine import Engine

    torch.set_num_threads(1)  # parallel runs share the cores
    overrides = dataset_overrides(dataset, rounds) + ALGORITHMS[algorithm]
    overrides += [f"training.compression={mode}", f"training.seed={seed}"]
    m = load_manifest(MANIFEST, overrides)
    run_dir = Path(out) / f"{dataset}-{algorithm}-{mode}-s{seed}"
    start = time.perf_counter()
    status = asyncio.run(
        Engine(m, run_dir, manifest_to_toml(m), run_id=run_dir.name, in_process=True).run()
    )
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    if status != "completed" or not metrics:
        raise RuntimeError(f"{run_dir.name}: {status}")
    return {
        "dataset": dataset, "algorithm": algorithm, "mode": mode, "seed": seed,
        "rounds": m.training.rounds, "acc_mean": metrics[-1]["acc_mean"],
        "acc_min": metrics[-1]["acc_min"], "wall_s": round(time.perf_counter() - start, 2),
    }  # fmt: skip


def activation_shape(dataset: str) -> tuple[int, ...]:
    """The cut-layer activation shape of one batch of the dataset's default model."""
    import torch

    from models import build_split, default_model, model_info
    from orchestrator.config.manifest import load_manifest

    m = load_manifest(MANIFEST, dataset_overrides(dataset, None))
    t = m.training
    model = default_model(t.dataset) if t.model == "auto" else t.model
    split = build_split(model, t.cut)
    with torch.no_grad():
        x = torch.zeros((t.batch_size, *model_info(model).input_shape))
        return tuple(split.client(x).shape)


def traffic(shape: tuple[int, ...]) -> dict[str, dict[str, int]]:
    """Frame bytes per round per device: activations up, gradients down, for every codec."""
    from edge_agent.protocol import encode

    rng = np.random.default_rng(0)
    acts = rng.standard_normal(shape).astype(np.float32)
    y = np.zeros(shape[0], np.int64)
    out = {}
    for mode in MODES:
        x, scale = compress.pack(acts, mode)
        up = len(encode("activations", round=1, x=x, x_scale=scale, y=y, compute_s=0.0))
        g, gscale = compress.pack(acts / 100, mode)
        down = len(encode("gradients", round=1, grad=g, grad_scale=gscale, loss=0.0))
        out[mode] = {"up": up, "down": down, "total": up + down}
    return out


def codec_times(shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Best microseconds of pack + unpack of one batch of activations, per codec."""
    acts = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = {}
    for mode in MODES:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            compress.unpack(*compress.pack(acts, mode))
            best = min(best, time.perf_counter() - t0)
        out[mode] = round(best * 1e6, 1)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per dataset and algorithm, per codec: accuracy mean ± std over seeds, Δ vs none (paired)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        out.setdefault(r["dataset"], {}).setdefault(r["algorithm"], {})
    for dataset, algos in out.items():
        for algorithm in algos:
            rows = [r for r in results if (r["dataset"], r["algorithm"]) == (dataset, algorithm)]
            base = {r["seed"]: r["acc_mean"] for r in rows if r["mode"] == "none"}
            for mode in MODES:
                mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["seed"])
                if not mine:
                    continue
                mean, std = _mean_std([r["acc_mean"] for r in mine])
                worst, _ = _mean_std([r["acc_min"] for r in mine])
                deltas = [r["acc_mean"] - base[r["seed"]] for r in mine if r["seed"] in base]
                d_mean, d_std = _mean_std(deltas) if deltas else (None, None)
                algos[algorithm][mode] = {
                    "acc_mean": mean, "acc_std": std, "worst_mean": worst,
                    "delta_vs_none": d_mean, "delta_std": d_std,
                    "seeds": [r["seed"] for r in mine], "rounds": mine[0]["rounds"],
                    "wall_s": statistics.fmean(r["wall_s"] for r in mine),
                }  # fmt: skip
    return out


def _pts(v: float | None, s: float | None) -> str:
    return "–" if v is None or s is None else f"{100 * v:+.1f} ± {100 * s:.1f}"


def markdown(
    summary: dict[str, dict[str, dict[str, Any]]],
    bytes_: dict[str, dict[str, dict[str, int]]],
    times: dict[str, dict[str, float]],
) -> str:
    lines = []
    for dataset, algos in summary.items():
        shape = "×".join(map(str, bytes_[dataset]["shape"]))  # type: ignore[arg-type]
        lines += [
            f"\n**{dataset}** (activations {shape} per batch)\n",
            "| codec | bytes up / down per round per device | vs float32 | pack+unpack µs "
            "| algorithm | final mean acc % (± std, seeds) | worst device % | Δ vs none, paired (pts) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        full = bytes_[dataset]["none"]["total"]  # type: ignore[index]
        for mode in MODES:
            b = bytes_[dataset][mode]
            for algorithm, modes in algos.items():
                row = modes.get(mode)
                if row is None:
                    continue
                lines.append(
                    f"| {mode} | {b['up']:,} / {b['down']:,} | {b['total'] / full:.2f} "  # type: ignore[index]
                    f"| {times[dataset][mode]:.0f} | {algorithm} "
                    f"| {100 * row['acc_mean']:.1f} ± {100 * row['acc_std']:.1f} ({len(row['seeds'])}) "
                    f"| {100 * row['worst_mean']:.1f} "
                    f"| {_pts(row['delta_vs_none'], row['delta_std']) if mode != 'none' else '–'} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.compression", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: digits, PSL, one seed, 2 rounds"
    )
    p.add_argument("--datasets", default="digits,fashion_mnist")
    p.add_argument("--algorithms", default="psl,gapsl")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=None, help="override training.rounds")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one core each)")
    p.add_argument("--out", default=None, help="where run directories go (default: a temp dir)")
    args = p.parse_args(argv)
    from bench.codec import machine_info

    if args.quick:
        datasets, algorithms, seeds, rounds = ["digits"], ["psl"], [0], 2
    else:
        datasets = [d for d in args.datasets.split(",") if d]
        algorithms = [a for a in args.algorithms.split(",") if a]
        seeds, rounds = [int(s) for s in args.seeds.split(",")], args.rounds
    if "fashion_mnist" in datasets and not (_data_root() / "fashion_mnist" / "train.npz").exists():
        print(f"fashion_mnist: no data under {_data_root()}; skipped", file=sys.stderr)
        datasets.remove("fashion_mnist")
    tmp = tempfile.TemporaryDirectory(prefix="gapsl-compression-") if args.out is None else None
    out = args.out or tmp.name  # type: ignore[union-attr]
    jobs = [
        (d, a, m, s, rounds, out)
        for d in datasets
        for a in algorithms
        for s in seeds
        for m in MODES
    ]
    started = time.perf_counter()
    try:
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                results = list(pool.map(run_one, jobs))
        else:
            results = [run_one(j) for j in jobs]
    finally:
        if tmp is not None:
            tmp.cleanup()
    bytes_: dict[str, Any] = {}
    times: dict[str, dict[str, float]] = {}
    for d in datasets:
        shape = activation_shape(d)
        bytes_[d] = {**traffic(shape), "shape": list(shape)}
        times[d] = codec_times(shape, 5 if args.quick else 50)
    summary = summarise(results)
    print(markdown(summary, bytes_, times))
    print(f"\n{len(results)} runs in {time.perf_counter() - started:.0f} s")
    digits = bytes_.get("digits") or next(iter(bytes_.values()))
    headline = {
        "int8_bytes_ratio": digits["int8"]["total"] / digits["none"]["total"],
        "fp16_bytes_ratio": digits["fp16"]["total"] / digits["none"]["total"],
        "quick": bool(args.quick),
        "machine": machine_info(),
        "bytes": bytes_,
        "codec_us": times,
        "accuracy": summary,
        "runs": results,
    }
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
