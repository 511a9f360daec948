"""The headless log lines: one greppable line per event and per evaluation, printed instead of
the dashboard when stdout is not a terminal (``run --no-dashboard``, ``watch`` into a pipe)."""

from __future__ import annotations

import json

from orchestrator.ui.snapshot import EvalPoint, EventLine


def format_event(e: EventLine) -> str:
    """One greppable line, e.g. `event=joined device=dev-1 t=1.23 text="..."`."""
    line = f"event={e.event} device={e.device or '-'} t={e.t:.2f}"
    # json quoting keeps the text on one line and unambiguous for `grep`/`awk`.
    return line + (f" text={json.dumps(e.text, ensure_ascii=False)}" if e.text else "")


def format_eval(p: EvalPoint, rounds: int) -> str:
    """One greppable line per evaluation, with the same field names as `metrics.jsonl`."""
    return (
        f"eval round={p.round}/{rounds} acc_mean={p.acc_mean:.3f} acc_min={p.acc_min:.3f} "
        f"acc_max={p.acc_max:.3f} loss={p.loss:.3f} time_s={p.time_s:.2f}"
    )
