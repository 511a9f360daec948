"""The accuracy study: GAPSL against PSL, SFL, EPSL and the centralised ceiling on non-IID data.

Every run is the in-process reference engine (``simulate``) on real Fashion-MNIST / CIFAR-10 from
a data directory, 8 devices, Dirichlet label skew, paired by seed. One command per table::

    python -m bench.accuracy main --dataset fashion_mnist      # all algorithms, alpha 0.1 and 0.5
    python -m bench.accuracy main --dataset cifar10
    python -m bench.accuracy ablation --dataset fashion_mnist  # LGI, EMA, lambda, GDA modes
    python -m bench.accuracy explore --dataset fashion_mnist --seeds 0 --variants a,b,...

Results (one JSON per run, the tables in markdown, plots) go to ``bench/results/accuracy/``;
the last line printed is a JSON object with the table's headline numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.variants import ABLATION, GATED, MAIN, PRESETS, VARIANTS, in_main

ROOT = Path(__file__).resolve().parent.parent
DIVERGED_BELOW = 1.5 * 0.1  # a run ending below 1.5x chance (10 classes everywhere) diverged
OUT = ROOT / "bench" / "results" / "accuracy"


DATA = {"fashion_mnist": "fashion_mnist", "cifar10": "cifar10", "digits": "digits"}
SETTINGS = {
    # rounds, eval_every, test_limit: CIFAR evaluation is the costly part on 2 cores
    "fashion_mnist": (300, 25, 2000),
    "cifar10": (300, 50, 1000),
    # the bundled digits (1,437 train / 360 test): small enough to compare every space quickly
    "digits": (300, 25, 0),
}


def _manifest(
    dataset: str, alpha: float, seed: int, devices: int, rounds: int = 0, device: str = "cpu"
) -> str:
    """The study's manifest; ``rounds`` (0 = the dataset's setting) and ``device`` ("cuda" on a
    GPU machine: the server partition and every in-process device there) for longer studies."""
    default_rounds, eval_every, test_limit = SETTINGS[dataset]
    rounds = rounds or default_rounds
    data_root = Path(os.environ.get("GAPSL_DATA_DIR", ROOT.parent / "shared" / "data"))
    lines = [
        "[testbed]", f'name = "acc-{dataset}"', 'listen = "127.0.0.1:0"',
        "[training]", f'dataset = "{dataset}"', f"rounds = {rounds}", "batch_size = 32",
        f"eval_every = {eval_every}", f"seed = {seed}", "lr = 0.05", "momentum = 0.9",
        "[data]", 'partition = "dirichlet"', f"alpha = {alpha}", f'dir = "{data_root / DATA[dataset]}"',
        f"test_limit = {test_limit}",
    ]  # fmt: skip
    for i in range(devices):
        lines += ["[[devices]]", f'id = "d{i}"', 'token = "bench"', f'device = "{device}"']
    if device != "cpu":
        lines += ["[server]", f'device = "{device}"']
    return "\n".join(lines) + "\n"


def run_dir(
    dataset: str, alpha: float, seed: int, variant: str, cut: str = "default", model: str = "auto",
    rounds: int = 0, device: str = "cpu",
) -> Path:  # fmt: skip
    suffix = ("" if cut == "default" else f"-cut-{cut}") + ("" if model == "auto" else f"-{model}")
    suffix += ("" if not rounds else f"-r{rounds}") + ("" if device == "cpu" else f"-{device}")
    return OUT / "runs" / f"{dataset}-a{alpha}-s{seed}-{variant}{suffix}"


def run_one(
    dataset: str, alpha: float, seed: int, variant: str, cut: str = "default", model: str = "auto",
    rounds: int = 0, device: str = "cpu", devices: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """One simulate run; returns its summary, metrics and LGI diagnostics (cached on disk)."""
    import torch

    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine

    out = run_dir(dataset, alpha, seed, variant, cut, model, rounds, device)
    cached = out / "result.json"
    if cached.exists():
        return json.loads(cached.read_text())
    torch.set_num_threads(1)  # two runs share the two cores
    m = parse_manifest(
        _manifest(dataset, alpha, seed, devices, rounds, device),
        overrides=[*VARIANTS[variant], f"training.cut={cut}", f"training.model={model}"],
    )
    start = time.perf_counter()
    status = asyncio.run(
        Engine(m, out, manifest_to_toml(m), run_id=out.name, in_process=True).run()
    )
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    churn, cos = [], []
    prev = None
    for line in (out / "rounds.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("leaders") is not None:
            cur = set(r["leaders"])
            if prev is not None:
                churn.append(len(cur ^ prev) / max(len(cur), 1))
            prev = cur
            if r["mean_cos"] is not None:  # a diverged run has NaN gradients: no cosine
                cos.append(r["mean_cos"])
    result = {
        "dataset": dataset, "alpha": alpha, "seed": seed, "variant": variant, "status": status,
        "final_mean": metrics[-1]["acc_mean"], "final_min": metrics[-1]["acc_min"],
        "curve": [(x["round"], x["acc_mean"]) for x in metrics],
        "spread": [(x["round"], x.get("client_spread")) for x in metrics],
        "bytes_per_round_per_device": traffic(m),
        "leader_churn": statistics.fmean(churn) if churn else None,
        "mean_cos": statistics.fmean(cos) if cos else None,
        "wall_s": time.perf_counter() - start,
    }  # fmt: skip
    cached.write_text(json.dumps(result))
    return result


def traffic(m: Any) -> float:
    """Bytes one device moves per round, from the sizes of the real protocol frames."""
    import numpy as np
    import torch

    from edge_agent.protocol import encode
    from models import build_split, default_model, model_info

    t = m.training
    model = default_model(t.dataset) if t.model == "auto" else t.model
    split = build_split(model, t.cut)
    x = torch.zeros((t.batch_size, *model_info(model).input_shape))
    acts = split.client(x).detach().numpy()
    y = np.zeros(t.batch_size, dtype=np.int64)
    total = len(encode("round", round=1, batch_size=t.batch_size))
    total += len(encode("activations", round=1, x=acts, y=y, compute_s=0.0))
    total += len(encode("gradients", round=1, grad=acts, loss=0.0))
    params = np.concatenate([p.detach().numpy().ravel() for p in split.client.parameters()])
    weights = {k: v.detach().numpy() for k, v in split.client.state_dict().items()}
    if t.algorithm == "gapsl" and m.gapsl.space == "client":
        total += len(encode("client_grad", round=1, grad=params, compute_s=0.0))
        total += len(encode("align", round=1, leader=params, mode="first_order", lam=1.0))
    if t.algorithm == "sfl":
        per_sync = len(encode("eval_result", round=1, weights=weights, compute_s=0.0))
        per_sync += len(encode("set_weights", round=1, weights=weights))
        total += per_sync / m.sfl.avg_every
    return float(total)


def _rounds_to(curve: list[list[float]], target: float) -> int | None:
    return next((int(r) for r, acc in curve if acc >= target), None)


def _fmt(values: list[float], pct: bool = True) -> str:
    if not values:
        return "–"
    scale = 100.0 if pct else 1.0
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    digits = 1 if pct else 3
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(results: list[dict[str, Any]], variants: list[str]) -> tuple[str, dict[str, Any]]:
    """Markdown table per alpha: mean/worst accuracy, rounds to PSL's final accuracy, traffic."""
    lines, headline = [], {}
    for alpha in sorted({r["alpha"] for r in results}):
        rows = [r for r in results if r["alpha"] == alpha]
        psl = {r["seed"]: r for r in rows if r["variant"] == "psl"}
        lines += [f"\n**α = {alpha}** ({len(psl)} seeds, paired)\n",
                  "| variant | final mean acc % | worst device % | Δ vs PSL (paired) | rounds to PSL final (× PSL) | bytes/round/device | leader churn | mean cos | client spread | diverged |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for v in variants:
            vr = [r for r in rows if r["variant"] == v]
            if not vr:
                continue
            deltas = [
                r["final_mean"] - psl[r["seed"]]["final_mean"] for r in vr if r["seed"] in psl
            ]
            ratios = []
            for r in vr:
                if r["seed"] in psl:
                    base = psl[r["seed"]]
                    mine = _rounds_to(r["curve"], base["final_mean"])
                    theirs = _rounds_to(base["curve"], base["final_mean"])
                    if mine is not None and theirs:
                        ratios.append(mine / theirs)
            ratio = (
                f"{statistics.fmean(ratios):.2f} ({len(ratios)}/{len(vr)} reach)"
                if ratios
                else "never"
            )
            churn = [r["leader_churn"] for r in vr if r["leader_churn"] is not None]
            cos = [r["mean_cos"] for r in vr if r["mean_cos"] is not None]
            spread = [
                r["spread"][-1][1] for r in vr if r.get("spread") and r["spread"][-1][1] is not None
            ]
            lines.append(
                f"| {v} | {_fmt([r['final_mean'] for r in vr])} | {_fmt([r['final_min'] for r in vr])} "
                f"| {_fmt(deltas)} | {ratio} | {vr[0]['bytes_per_round_per_device']:,.0f} "
                f"| {_fmt(churn, pct=False) if churn else '–'} | {_fmt(cos, pct=False) if cos else '–'} "
                f"| {_fmt(spread, pct=False) if spread else '–'} "
                f"| {sum(r['final_mean'] < DIVERGED_BELOW for r in vr)}/{len(vr)} |"
            )
            headline[f"{v}@{alpha}"] = round(statistics.fmean(r["final_mean"] for r in vr), 4)
    return "\n".join(lines) + "\n", headline


def plot(results: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        return
    alphas = sorted({r["alpha"] for r in results})
    variants = list(dict.fromkeys(r["variant"] for r in results))
    colors = {v: f"C{k % 10}" for k, v in enumerate(variants)}  # the same colour in every panel
    fig = Figure(figsize=(6 * len(alphas), 4))
    for k, alpha in enumerate(alphas):
        ax = fig.add_subplot(1, len(alphas), k + 1)
        for v in variants:
            runs = [r for r in results if r["alpha"] == alpha and r["variant"] == v]
            if not runs:
                continue
            rounds = [x[0] for x in runs[0]["curve"]]
            mean = [statistics.fmean(r["curve"][i][1] for r in runs) for i in range(len(rounds))]
            ax.plot(rounds, mean, label=f"{v} ({len(runs)} seeds)", color=colors[v])
        ax.set_title(f"{results[0]['dataset']}, α = {alpha}")
        ax.set_xlabel("round")
        ax.set_ylabel("mean device accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("table", choices=["main", "ablation", "gated", "explore"])
    p.add_argument(
        "--preset", default="", choices=["", *PRESETS], help="a gated setup: dataset, model, cut"
    )
    p.add_argument("--model", default="auto", help="training.model (default: the dataset's own)")
    p.add_argument("--dataset", default="fashion_mnist", choices=sorted(SETTINGS))
    p.add_argument("--alphas", default="0.1,0.5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="")
    p.add_argument("--cut", default="default", help="the model's cut point (default: its own)")
    p.add_argument(
        "--name", default="", help="name of the table and plot files (default: TABLE-DATASET)"
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=0, help="rounds per run (default: the dataset's)")
    p.add_argument("--device", default="cpu", help='"cuda": server and devices on the GPU')
    p.add_argument("--cached-only", action="store_true", help="tabulate finished runs, start none")
    args = p.parse_args(argv)
    if args.preset:
        args.dataset, args.model, args.cut = PRESETS[args.preset]
    variants = {"main": MAIN, "ablation": ABLATION, "gated": GATED}.get(args.table) or []
    if args.variants:
        variants = args.variants.split(",")
    alphas = [float(a) for a in args.alphas.split(",")]
    if args.table == "ablation" and args.alphas == "0.1,0.5":
        alphas = [0.1]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [
        (args.dataset, a, s, v, args.cut, args.model, args.rounds, args.device)
        for a in alphas
        for s in seeds
        for v in variants
        if args.variants or args.table != "main" or in_main(args.dataset, a, s, v, seeds[0])
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    if args.cached_only:
        jobs = [j for j in jobs if (run_dir(*j) / "result.json").exists()]
    results = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_one, *job) for job in jobs]
        for job, fut in zip(jobs, futures):
            r = fut.result()
            results.append(r)
            print(
                f"{job}: final mean {r['final_mean']:.3f} worst {r['final_min']:.3f} ({r['wall_s']:.0f} s)",
                flush=True,
            )
    md, headline = table(results, variants)
    name = args.name or f"{args.table}-{args.preset or args.dataset}" + (
        "" if args.cut == "default" or args.preset else f"-{args.cut}"
    )
    (OUT / f"{name}.md").write_text(md)
    plot(results, OUT / f"{name}.png")
    print(md)
    print(json.dumps({"table": name, **headline}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
