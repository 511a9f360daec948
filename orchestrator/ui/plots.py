"""The report's PNG plots, each drawn from the runs' records on matplotlib's Agg canvas.

matplotlib is imported only when a plot is drawn (it is the optional ``report`` extra), and no
pyplot state is used, so no GUI backend is ever chosen.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from orchestrator.records.reader import RunStats, by_round, finite

__all__ = ["PLOTS", "legend_names", "ms_axis"]

Drawn = Any  # a matplotlib Figure to save, or a str saying why nothing was drawn ("" = silently)


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


def legend_names(stats: Sequence[RunStats]) -> list[str]:
    """What a legend calls each run: its algorithm and seed, which is what a reader compares
    (a run directory's name says when it ran). Runs that share both are told apart by the
    settings in which they differ, else by their directory."""
    base = [f"{s.algorithm}, seed {s.seed}" for s in stats]
    names = []
    for i, (s, name) in enumerate(zip(stats, base)):
        twins = [o for j, (o, other) in enumerate(zip(stats, base)) if other == name and j != i]
        if not twins:
            names.append(name)
            continue
        differ = sorted(k for k in s.config if any(o.config.get(k) != s.config[k] for o in twins))
        extra = ", ".join(f"{k.rpartition('.')[2]}={s.config[k]}" for k in differ[:2])
        names.append(f"{name}, {extra}" if extra else f"{name} ({s.label})")
    return names


def ms_axis(ax: Any, top_ms: float) -> None:
    """A y axis of milliseconds from 0 with a little headroom above ``top_ms``, so nothing drawn
    touches the frame, and plain ticks (no offset, no scientific notation)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.set_ylim(0, max(top_ms, 1e-3) * 1.12)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    digits = 0 if top_ms >= 20 else (1 if top_ms >= 2 else 2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.{digits}f}"))


def _accuracy(stats: Sequence[RunStats], x_key: str, x_label: str) -> Drawn:
    drawn = [(i, s) for i, s in enumerate(stats) if s.evals]
    if not drawn:
        return "no evaluations recorded"
    names = legend_names(stats)
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, s in drawn:
        pts = [e for e in s.evals if finite(e.get(x_key)) is not None]
        x = [e[x_key] for e in pts]
        mean = [100 * e["acc_mean"] for e in pts]
        lo = [100 * (finite(e.get("acc_min")) or e["acc_mean"]) for e in pts]
        hi = [100 * (finite(e.get("acc_max")) or e["acc_mean"]) for e in pts]
        marker = "o" if len(pts) <= 40 else None
        ax.plot(x, mean, color=_color(i), marker=marker, markersize=3, label=names[i])
        ax.fill_between(x, lo, hi, color=_color(i), alpha=0.18, linewidth=0)
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Mean accuracy over devices (band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


_PHASES = (
    ("compute", "device compute (slowest device)"),
    ("uplink", "uplink (slowest device)"),
    ("server", "server"),
    ("downlink", "downlink"),
)


def _round_time(stats: Sequence[RunStats]) -> Drawn:
    names = dict(zip((id(s) for s in stats), legend_names(stats)))
    drawn = [s for s in stats if s.breakdown]
    if not drawn:
        return "no rounds recorded"
    fig = _figure(max(7.5, 1.1 * len(drawn) + 4.5), 4.5)
    ax = fig.add_subplot()
    x = list(range(len(drawn)))
    bottom = [0.0] * len(drawn)
    for j, (key, label) in enumerate(_PHASES):
        height = [1000 * s.breakdown.get(key, 0.0) for s in drawn]
        ax.bar(x, height, 0.6, bottom=bottom, color=_color(j), label=label)
        bottom = [b + h for b, h in zip(bottom, height)]
    measured = [
        (xi, 1000 * s.mean_round_s) for xi, s in zip(x, drawn) if s.mean_round_s is not None
    ]
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
    _run_ticks(ax, [names[id(s)] for s in drawn])
    ms_axis(ax, max([*bottom, *(m[1] for m in measured)]))
    ax.set_ylabel("ms per round (mean over rounds)")
    ax.set_title("Where a round's time goes")
    ax.grid(axis="y", alpha=0.3)
    # Beside the axes, where constrained layout makes room for it: over the bars it would hide
    # the tallest one.
    ax.legend(fontsize=8, markerscale=0.3, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _final_device_acc(s: RunStats) -> dict[str, float]:
    for e in reversed(s.evals):
        acc = e.get("acc")
        if isinstance(acc, dict):
            return {str(k): 100 * v for k, v in acc.items() if finite(v) is not None}
    return {}


def _device_accuracy(stats: Sequence[RunStats]) -> Drawn:
    names = legend_names(stats)
    maps = [(i, acc) for i, s in enumerate(stats) for acc in [_final_device_acc(s)] if acc]
    if not maps:
        return "no per-device accuracies recorded"
    devices = sorted({d for _, acc in maps for d in acc}, key=_natural)
    fig = _figure(max(6.0, 0.35 * len(devices) * len(maps) + 3), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(maps)
    for k, (i, acc) in enumerate(maps):
        shift = (k - (len(maps) - 1) / 2) * width
        have = [j for j, d in enumerate(devices) if d in acc]
        heights = [acc[devices[j]] for j in have]
        ax.bar([j + shift for j in have], heights, width, color=_color(i), label=names[i])
    # From 0: a bar's length is what it shows, and an axis cut below the lowest bar makes a
    # few points' difference look like a factor.
    ax.set_ylim(0, 100)
    ax.set_xticks(range(len(devices)))
    ax.set_xticklabels(devices, rotation=45 if len(devices) > 8 else 0)
    ax.set_ylabel("test accuracy at the last evaluation (%)")
    ax.set_title("Final accuracy of each device's model")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _cos_matrix(rec: dict[str, Any]) -> list[list[float]] | None:
    cos = rec.get("cos")
    if not isinstance(cos, list) or not cos:
        return None
    if not all(isinstance(row, list) and len(row) == len(cos) for row in cos):
        return None
    return [[v if (v := finite(x)) is not None else math.nan for x in row] for row in cos]


def _cosine(stats: Sequence[RunStats]) -> Drawn:
    run_names = dict(zip((id(s) for s in stats), legend_names(stats)))
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
    fig.suptitle(f"Cosine between device gradients — {run_names[id(s)]} (* leader)")
    return fig


# (file, title, draw): draw returns the figure to save, else why not ("" = silently).
PLOTS: tuple[tuple[str, str, Callable[[Sequence[RunStats]], Drawn]], ...] = (
    (
        "accuracy_vs_round.png",
        "Accuracy vs round",
        lambda stats: _accuracy(stats, "round", "round"),
    ),
    (
        "accuracy_vs_time.png",
        "Accuracy vs wall time",
        lambda stats: _accuracy(stats, "time_s", "seconds since the run started"),
    ),
    ("round_time.png", "Round time breakdown", _round_time),
    ("device_accuracy.png", "Final accuracy per device", _device_accuracy),
    ("cosine_heatmap.png", "Gradient cosine between devices", _cosine),
)


def draw_plot(file: str, stats: Sequence[RunStats], path: Path) -> str | None:
    """Draw the plot named ``file`` into ``path``; None when written, else why not."""
    for name, _title, draw in PLOTS:
        if name == file:
            fig = draw(stats)
            if isinstance(fig, str):
                return fig
            fig.savefig(path, dpi=120)
            return None
    raise KeyError(file)
