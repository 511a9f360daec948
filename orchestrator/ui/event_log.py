"""The event log panel: the run's events and its evaluations, in time order, newest last.

Evaluations come from ``metrics.jsonl`` and events from ``events.jsonl``; they meet only here,
at render time, by their times (both seconds since the run started), so the fold keeps each
snapshot field to one record file.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from orchestrator.ui.cells import fit
from orchestrator.ui.snapshot import EvalPoint, EventLine, RunSnapshot

EVENT_STYLES = {
    "joined": "green", "lost": "red", "refused": "red", "straggler": "yellow", "unstable": "red",
    "awaiting_return": "yellow", "returned": "green", "eval": "cyan",
}  # fmt: skip
_EVENT_W = 12
_DEVICE_W = 16


def eval_text(p: EvalPoint) -> str:
    """``round 40 acc 91.3 % (min 88.1)``: an evaluation as the log says it."""
    return f"round {p.round} acc {100 * p.acc_mean:.1f} % (min {100 * p.acc_min:.1f})"


def log_entries(snap: RunSnapshot, n: int) -> list[EventLine]:
    """The last ``n`` entries of the log: events and evaluations merged by time (an event
    before an evaluation of the same instant: the checkpoint precedes the score it keeps)."""
    evals = [EventLine(p.time_s, "eval", None, eval_text(p)) for p in snap.evals[-n:]]
    merged = sorted([*snap.events[-n:], *evals], key=lambda e: e.t)  # stable: events first
    return merged[-n:] if n > 0 else []


def log_size(snap: RunSnapshot) -> int:
    """How many entries the log could show at most (its want, before the height decides)."""
    return len(snap.events) + len(snap.evals)


def events_panel(entries: Sequence[EventLine], width: int, height: int) -> Panel:
    cw = width - 4
    tail = list(entries)
    ew = min(max((len(e.event) for e in tail), default=0), _EVENT_W)
    dw = min(max((len(e.device or "") for e in tail), default=0), _DEVICE_W)
    body = []
    for e in tail:
        line = Text(f"{e.t:8.1f}s ", style="dim")
        line.append(f"{e.event:<{ew}}", style=EVENT_STYLES.get(e.event, "bold"))
        line.append(f" {(e.device or '')[:dw]:<{dw}} {' '.join(e.text.split())}")
        body.append(fit(line, cw))
    if not body:
        body.append(Text("no events yet", style="dim"))
    return Panel(Group(*body), title="events", title_align="left", height=height)
