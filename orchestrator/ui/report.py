"""``gapsl-orchestrator report``: PNG plots and a markdown summary comparing run directories.

Everything is derived from the run records alone (see ``runread``), so a report can be drawn on
any machine the run directories are copied to. matplotlib is optional (the ``report`` extra):
without it only ``summary.md`` is written.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import ExitCode, RunError
from orchestrator.records.reader import RunStats, collect, load_run
from orchestrator.ui.plots import PLOTS, draw_plot

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
        for file, title, _draw in PLOTS:
            skipped = draw_plot(file, stats, out_dir / file)
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
