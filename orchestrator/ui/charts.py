"""The trends panel: block charts of accuracy, loss and round time, with the latency model's
predicted round time drawn as a series on the measured one's scale."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from orchestrator.ui.cells import fit
from orchestrator.ui.snapshot import RunSnapshot

_BLOCKS = " ▁▂▃▄▅▆▇█"
_LABEL_W = 15  # chart label column: "accuracy 0.912 "
# The order in which the charts get one more row: accuracy first (it is what a run is judged
# by, DESIGN.md), then loss and round time, then the prediction beside it.
_ORDER = (0, 1, 2, 3, 0, 1, 0, 2, 0, 1, 3, 0, 2, 1, 0)


def _caps(lines: int, pred: bool) -> list[int]:
    """Rows per chart at most: 6, 4, 3, 2 in 15 lines; a taller panel's extra rows go mostly
    to accuracy."""
    loss, rnd, p = max(4, lines // 4), max(3, lines // 5), 2 if pred else 0
    return [max(6, lines - loss - rnd - p), loss, rnd, p]


def chart_rows(
    values: Sequence[float],
    width: int,
    rows: int,
    scale: tuple[float, float] | None = None,
) -> list[str]:
    """A block chart of the last `width` values, `rows` tall (top row first); the smallest
    value still shows as a sliver so a flat series is visibly a line, not a gap; a missing
    value (NaN) is a gap. ``scale`` (lo, hi) draws on another series' scale, so two series
    compare cell by cell."""
    vals = list(values)[-max(width, 0) :] if width > 0 else []
    known = [v for v in vals if v == v]
    if not known:
        return [""] * rows
    # A short history is stretched (up to 3 cells a point) so a few evaluations still read.
    stretch = min(max(width // len(vals), 1), 3)
    vals = [v for v in vals for _ in range(stretch)]
    lo, hi = scale if scale is not None else (min(known), max(known))
    top = rows * 8

    def level(v: float) -> int:
        if v != v:
            return 0
        if hi <= lo:
            return top // 2
        return 1 + round((min(max(v, lo), hi) - lo) / (hi - lo) * (top - 1))

    levels = [level(v) for v in vals]
    return [
        "".join(_BLOCKS[min(max(lv - r * 8, 0), 8)] for lv in levels)
        for r in range(rows - 1, -1, -1)
    ]


def _chart_block(
    name: str,
    values: Sequence[float],
    fmt: Callable[[float], str],
    rows: int,
    cw: int,
    note: str,
    scale: tuple[float, float] | None = None,
) -> list[Text]:
    known = [v for v in values if v == v]
    if not known:
        empty = Text(f"{name:<{_LABEL_W}}") + Text("no data yet", style="dim")
        return [fit(empty, cw)] + [Text("") for _ in range(rows - 1)]
    labels = [f"{name} {fmt(known[-1])}"]
    if rows >= 2:
        span = [v for v in values[-(cw - _LABEL_W) :] if v == v] or known
        labels.append(note or f"{fmt(min(span))}–{fmt(max(span))}")
    labels += [""] * (rows - len(labels))
    out: list[Text] = []
    for label, bars in zip(labels, chart_rows(values, cw - _LABEL_W, rows, scale)):
        line = Text(f"{label[: _LABEL_W - 1]:<{_LABEL_W}}", style="bold" if out == [] else "dim")
        line.append(bars, style="cyan")
        out.append(fit(line, cw))
    return out


def charts(snap: RunSnapshot, width: int, height: int) -> Panel:
    cw, lines = width - 4, max(height - 2, 1)
    rounds = snap.recent_rounds
    times = [r.round_time_s for r in rounds]
    # The prediction of every round that has one, aligned with the measured series (NaN gaps).
    pred = [r.predicted_s if r.predicted_s is not None else float("nan") for r in rounds]
    has_pred = any(p == p for p in pred)
    caps, rows = _caps(lines, has_pred), [0, 0, 0, 0]
    while sum(rows) < min(lines, sum(caps)):
        for i in _ORDER:
            if sum(rows) < lines and rows[i] < caps[i]:
                rows[i] += 1
    w = cw - _LABEL_W
    window = [v for v in times[-w:] + pred[-w:] if v == v]
    scale = (min(window), max(window)) if window and has_pred else None
    last_pred = next((p for p in reversed(pred) if p == p), None)
    # Without room for the prediction's own series, the round chart's second line names it.
    note = "" if rows[3] or last_pred is None else f"pred {last_pred:.2f}s"

    def secs(v: float) -> str:
        return f"{v:.2f}s"

    blocks = [
        ("accuracy", [p.acc_mean for p in snap.evals], rows[0], "", None),
        ("loss", [r.loss for r in rounds], rows[1], "", None),
        ("round", times, rows[2], note, scale),
        ("pred", pred, rows[3], "latency model", scale),
    ]
    body: list[Text] = []
    for name, vals, n, nt, sc in blocks:
        if n:
            fmt = secs if name in ("round", "pred") else _three
            body += _chart_block(name, vals, fmt, n, cw, nt, sc)
    return Panel(Group(*body), title="trends", title_align="left", height=height)


def _three(v: float) -> str:
    return f"{v:.3f}"
