"""The headless log lines: one greppable line per event and per evaluation, printed instead of
the dashboard when stdout is not a terminal (``run --no-dashboard``, ``watch`` into a pipe)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from orchestrator.ui.snapshot import EvalPoint, EventLine

# A record key's unit suffix -> how its value reads for people (the suffix leaves the label).
_UNITS = ("_ms_per_sample", "_mbps", "_ms", "_bytes", "_s")


def _sig(v: float) -> str:
    """Two significant digits (whole numbers from 10 up): what a person compares at a glance."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    digits = max(0, 1 - int(math.floor(math.log10(abs(v)))))
    return f"{v:.{min(digits, 4)}f}"


def human(key: str, value: Any) -> str:
    """One record field as people read it: ``uplink 5.9 Gbit/s``, ``load 6.6 s``, ``round 4``."""
    unit = next((u for u in _UNITS if key.endswith(u)), "")
    label = key[: -len(unit)] if unit else key
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not unit:
        shown = _sig(value) if isinstance(value, float) else str(value)
        return f"{label} {shown}"
    v = float(value)
    if unit == "_mbps":
        text = f"{_sig(v / 1000)} Gbit/s" if v >= 1000 else f"{_sig(v)} Mbit/s"
    elif unit == "_bytes":
        scaled, name = v, "B"
        for name in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(scaled) < 1024 or name == "TiB":
                break
            scaled /= 1024
        text = f"{_sig(scaled) if name != 'B' else int(v)} {name}"
    elif unit == "_s" and v >= 60:
        text = f"{int(v // 60)}m{int(v % 60):02d}s"
    else:
        text = f"{_sig(v)} {'ms/sample' if unit == '_ms_per_sample' else unit[1:]}"
    return f"{label} {text}"


def key_values(fields: Mapping[str, Any]) -> str:
    """An event's fields for the headless lines, as the records spell them (``url=ws://...``)
    for grep and awk; the empty (None) ones left out, as on the dashboard."""
    return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None and v != "")


def describe(fields: Mapping[str, Any]) -> str:
    """An event's fields for the log: rounded, with units, and without the empty (None) ones."""
    return ", ".join(human(k, v) for k, v in fields.items() if v is not None and v != "")


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
