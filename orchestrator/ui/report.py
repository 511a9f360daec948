"""``gapsl-orchestrator report``: PNG plots and a markdown summary comparing run directories.

Everything is derived from the run records alone (see ``runread``), so a report can be drawn on
any machine the run directories are copied to. matplotlib is optional (the ``report`` extra):
without it only ``summary.md`` is written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import ExitCode, RunError
from orchestrator.records.reader import RunStats, by_round, collect, finite, load_run

__all__ = ["INSTALL_HINT", "add_parser", "build_report", "default_out_dir", "run_report"]

INSTALL_HINT = "pip install 'gapsl-testbed[report]'  (or: pip install matplotlib)"
# Fraction of the best final mean accuracy a run must reach to count as "converged".
TARGET_FRACTION = 0.9


# --- markdown ---------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _secs(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|")


def _spread(values: Sequence[float | None], fmt: Callable[[float], str], of: int = 0) -> str:
    """``mean ± std`` over the values present (std across seeds, n − 1)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return "—"
    text = fmt(statistics.fmean(xs))
    if len(xs) > 1:
        text += f" ± {fmt(statistics.stdev(xs))}"
    if of and len(xs) < of:
        text += f" ({len(xs)} of {of})"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _groups(stats: Sequence[RunStats]) -> list[tuple[str, list[RunStats]]]:
    """Runs of one configuration (seeds apart), each group with the settings that tell it apart
    from other groups of the same algorithm / dataset / partition."""
    groups: dict[tuple[str, ...], list[RunStats]] = {}
    for s in stats:
        key = (s.algorithm, s.dataset, s.partition, repr(sorted(s.config.items())))
        groups.setdefault(key, []).append(s)
    out = []
    for this, members in groups.items():
        mine = members[0].config
        others = [g[0].config for k, g in groups.items() if k[:3] == this[:3] and k != this]
        differ = sorted(k for k in mine if any(o.get(k) != mine[k] for o in others))
        out.append((", ".join(f"{k}={mine[k]}" for k in differ), members))
    return out


def _markdown(
    stats: Sequence[RunStats], plots: Sequence[tuple[str, str]], notes: Sequence[str]
) -> str:
    finals = [s.final_mean for s in stats if s.final_mean is not None]
    target = TARGET_FRACTION * max(finals) if finals else None
    reach = [s.reached(target) if target is not None else None for s in stats]
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        "# Run report",
        "",
        f"{len(stats)} run(s), written {stamp}. Accuracy is each device's client ∘ server model "
        "on the common test set, in percent: mean, min and max over devices.",
        "",
    ]
    target_text = f"{_pct(target)} %" if target is not None else "—"
    lines += [
        "## Runs",
        "",
        f"*Rounds to target*: the first evaluated round whose mean accuracy reaches "
        f"{TARGET_FRACTION:.0%} of the best final mean accuracy among these runs ({target_text}). "
        "*Round s*: mean measured round time; *wall s*: the whole run, start-up included.",
        "",
    ]
    header = ["run", "algorithm", "dataset", "partition", "seed", "devices", "status", "rounds"]
    header += ["final mean", "final min", "final max", "best mean", "rounds to target"]
    header += ["round s", "wall s"]
    rows = [
        [s.label, s.algorithm, s.dataset, s.partition, s.seed, s.devices, s.run.status, s.rounds]
        + [_pct(s.final_mean), _pct(s.final_min), _pct(s.final_max), _pct(s.best_mean)]
        + [r if r is not None else "—", _secs(s.mean_round_s), _secs(s.wall_s, 1)]
        for s, r in zip(stats, reach)
    ]
    lines += _table(header, [["—" if c is None else c for c in row] for row in rows]) + [""]

    groups = _groups(stats)
    if any(len({repr(s.seed) for s in members}) > 1 for _, members in groups):
        lines += [
            "## Across seeds",
            "",
            "Mean ± standard deviation over the runs of each "
            "configuration that differ only in their seed.",
            "",
        ]
        reached = dict(zip((id(s) for s in stats), reach))
        header = ["algorithm", "dataset", "partition", "settings", "runs", "seeds", "final mean"]
        header += ["final min", "best mean", "rounds to target", "round s", "wall s"]
        rows = []
        for differ, m in groups:
            rows.append(
                [m[0].algorithm, m[0].dataset, m[0].partition, differ or "—", len(m)]
                + [", ".join(str(s.seed) for s in m)]
                + [_spread([s.final_mean for s in m], lambda v: f"{100 * v:.1f}")]
                + [_spread([s.final_min for s in m], lambda v: f"{100 * v:.1f}")]
                + [_spread([s.best_mean for s in m], lambda v: f"{100 * v:.1f}")]
                + [_spread([reached[id(s)] for s in m], lambda v: f"{v:.0f}", of=len(m))]
                + [_spread([s.mean_round_s for s in m], lambda v: f"{v:.3f}")]
                + [_spread([s.wall_s for s in m], lambda v: f"{v:.1f}")]
            )
        lines += _table(header, rows) + [""]

    if plots:
        lines += ["## Plots", ""]
        for file, title in plots:
            lines += [f"### {title}", "", f"![{title}]({file})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Sources", ""] + [f"- `{s.label}`: `{s.run.path}`" for s in stats] + [""]
    return "\n".join(lines)


def _notes(stats: Sequence[RunStats]) -> list[str]:
    notes = []
    for s in stats:
        run = s.run
        if run.status != "completed":
            reason = run.summary.get("error")
            notes.append(f"{s.label}: {run.status}" + (f" ({reason})" if reason else ""))
        for name, n in run.dropped.items():
            notes.append(f"{s.label}: left out {n} truncated last line of {name}.jsonl")
        if run.manifest_error:
            notes.append(f"{s.label}: stored manifest not readable: {run.manifest_error}")
    return notes


# --- plots (matplotlib's Agg canvas, imported only when drawing) ------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on its own Agg canvas: no pyplot state, so no GUI backend is ever chosen.
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _color(index: int) -> str:
    return f"C{index % 10}"  # a run keeps its colour in every plot


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _run_ticks(ax: Any, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)))
    long = len(labels) > 3 or max(map(len, labels)) > 14
    ax.set_xticklabels(labels, rotation=25 if long else 0, ha="right" if long else "center")


def _accuracy(stats: Sequence[RunStats], path: Path, x_key: str, x_label: str) -> str | None:
    drawn = [(i, s) for i, s in enumerate(stats) if s.evals]
    if not drawn:
        return "no evaluations recorded"
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, s in drawn:
        pts = [e for e in s.evals if finite(e.get(x_key)) is not None]
        x = [e[x_key] for e in pts]
        mean = [100 * e["acc_mean"] for e in pts]
        lo = [100 * (finite(e.get("acc_min")) or e["acc_mean"]) for e in pts]
        hi = [100 * (finite(e.get("acc_max")) or e["acc_mean"]) for e in pts]
        marker = "o" if len(pts) <= 40 else None
        ax.plot(x, mean, color=_color(i), marker=marker, markersize=3, label=s.label)
        ax.fill_between(x, lo, hi, color=_color(i), alpha=0.18, linewidth=0)
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Mean accuracy over devices (band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return None


_PHASES = (
    ("compute", "device compute (slowest device)"),
    ("uplink", "uplink (slowest device)"),
    ("server", "server"),
    ("downlink", "downlink"),
)


def _round_time(stats: Sequence[RunStats], path: Path) -> str | None:
    drawn = [s for s in stats if s.breakdown]
    if not drawn:
        return "no rounds recorded"
    fig = _figure(max(7.5, 1.1 * len(drawn) + 4.5), 4.5)
    ax = fig.add_subplot()
    x = list(range(len(drawn)))
    bottom = [0.0] * len(drawn)
    for j, (key, label) in enumerate(_PHASES):
        height = [s.breakdown.get(key, 0.0) for s in drawn]
        ax.bar(x, height, 0.6, bottom=bottom, color=_color(j), label=label)
        bottom = [b + h for b, h in zip(bottom, height)]
    measured = [(xi, s.mean_round_s) for xi, s in zip(x, drawn) if s.mean_round_s is not None]
    if measured:
        ax.scatter(
            [m[0] for m in measured],
            [m[1] for m in measured],
            marker="_",
            s=900,
            linewidths=2,
            color="black",
            zorder=3,
            label="measured round time",
        )
    _run_ticks(ax, [s.label for s in drawn])
    ax.set_ylabel("seconds per round (mean over rounds)")
    ax.set_title("Where a round's time goes")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, markerscale=0.3, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120)
    return None


def _final_device_acc(s: RunStats) -> dict[str, float]:
    for e in reversed(s.evals):
        acc = e.get("acc")
        if isinstance(acc, dict):
            return {str(k): 100 * v for k, v in acc.items() if finite(v) is not None}
    return {}


def _device_accuracy(stats: Sequence[RunStats], path: Path) -> str | None:
    maps = [(i, s, acc) for i, s in enumerate(stats) for acc in [_final_device_acc(s)] if acc]
    if not maps:
        return "no per-device accuracies recorded"
    devices = sorted({d for _, _, acc in maps for d in acc}, key=_natural)
    fig = _figure(max(6.0, 0.35 * len(devices) * len(maps) + 3), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(maps)
    for k, (i, s, acc) in enumerate(maps):
        shift = (k - (len(maps) - 1) / 2) * width
        have = [j for j, d in enumerate(devices) if d in acc]
        heights = [acc[devices[j]] for j in have]
        ax.bar([j + shift for j in have], heights, width, color=_color(i), label=s.label)
    lowest = min(v for _, _, acc in maps for v in acc.values())
    # Final accuracies sit close together: start the axis below the lowest bar, not at zero.
    ax.set_ylim(max(0.0, 10 * ((lowest - 5) // 10)), 100)
    ax.set_xticks(range(len(devices)))
    ax.set_xticklabels(devices, rotation=45 if len(devices) > 8 else 0)
    ax.set_ylabel("test accuracy at the last evaluation (%)")
    ax.set_title("Final accuracy of each device's model")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return None


def _cos_matrix(rec: dict[str, Any]) -> list[list[float]] | None:
    cos = rec.get("cos")
    if not isinstance(cos, list) or not cos:
        return None
    if not all(isinstance(row, list) and len(row) == len(cos) for row in cos):
        return None
    return [[v if (v := finite(x)) is not None else math.nan for x in row] for row in cos]


def _cosine(stats: Sequence[RunStats], path: Path) -> str | None:
    for s in stats:
        found = [(rec, m) for rec in by_round(s.run.rounds) for m in [_cos_matrix(rec)] if m]
        if found:
            break
    else:
        return ""  # drawn only for runs that record the matrix: nothing to report
    k = min(4, len(found))
    picks = sorted({round(i * (len(found) - 1) / max(k - 1, 1)) for i in range(k)})
    fig = _figure(3.4 * len(picks) + 1.2, 3.8)
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    image = None
    for ax, index in zip(axes, picks):
        rec, matrix = found[index]
        n = len(matrix)
        names = list(rec.get("devices") or {})
        names = names if len(names) == n else [str(j) for j in range(n)]
        leaders = set(rec.get("leaders") or [])
        names = [f"{d}*" if d in leaders else d for d in names]
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"round {rec['round']}")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticklabels(names, fontsize=7)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine")
    fig.suptitle(f"Cosine between device gradients — {s.label} (* leader)")
    fig.savefig(path, dpi=120)
    return None


# (file, title, draw): draw returns None when it wrote the file, else why not ("" = silently).
_PLOTS: tuple[tuple[str, str, Callable[[Sequence[RunStats], Path], str | None]], ...] = (
    (
        "accuracy_vs_round.png",
        "Accuracy vs round",
        lambda stats, path: _accuracy(stats, path, "round", "round"),
    ),
    (
        "accuracy_vs_time.png",
        "Accuracy vs wall time",
        lambda stats, path: _accuracy(stats, path, "time_s", "seconds since the run started"),
    ),
    ("round_time.png", "Round time breakdown", _round_time),
    ("device_accuracy.png", "Final accuracy per device", _device_accuracy),
    ("cosine_heatmap.png", "Gradient cosine between devices", _cosine),
)


# --- the report -------------------------------------------------------------------------------


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def build_report(run_dirs: Sequence[Path], out_dir: Path) -> list[Path]:
    """Read the run directories, write PNG plots and ``summary.md`` into ``out_dir``.

    Returns the files written (``summary.md`` last). Raises RunError when a path is not a run
    directory. Without matplotlib only ``summary.md`` is written, saying how to get the plots.
    """
    if not run_dirs:
        raise RunError("report: give at least one run directory")
    stats = collect([load_run(p) for p in run_dirs])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: list[tuple[str, str]] = []
    notes = _notes(stats)
    if _have_matplotlib():
        for file, title, draw in _PLOTS:
            skipped: str | None = draw(stats, out_dir / file)
            if skipped is None:
                written.append(out_dir / file)
                plots.append((file, title))
            elif skipped:
                notes.append(f"{file} not drawn: {skipped}")
    else:
        message = f"plots not drawn: matplotlib is not installed; install it with {INSTALL_HINT}"
        notes.insert(0, message)
        print(f"gapsl-orchestrator report: {message}", file=sys.stderr)
    summary = out_dir / "summary.md"
    summary.write_text(_markdown(stats, plots, notes), encoding="utf-8")
    written.append(summary)
    return written


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    """``report/`` inside a single run directory, else ``./report-<timestamp>``."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "report"
    return Path(f"report-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``report`` command (its handler is ``run_report``, also set as ``func``)."""
    p = sub.add_parser(
        "report",
        help="plots and a markdown summary comparing run directories",
        description="Write PNG plots and summary.md comparing one or more run directories.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="where to write (default: RUN_DIR/report for one run, else ./report-<time>)",
    )
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Handle ``report``; a RunError (not a run directory, damaged records) propagates."""
    out = args.out if args.out is not None else default_out_dir(args.run_dirs)
    for path in build_report(args.run_dirs, out):
        print(path)
    return ExitCode.OK
