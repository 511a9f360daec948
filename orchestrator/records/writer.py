"""The run directory: the resolved manifest, append-only JSONL records, and the summary.

Every JSONL line is written whole and flushed at once, so a killed orchestrator loses nothing it
had written; ``summary.json`` is replaced atomically (write, fsync, rename). A line a kill cut
short is cut off when the files are opened again (``run --resume``), so the resumed run's first
line does not glue onto it; a ``torn_line`` event says so. Subscribers hear of every record
once it is in its file, as a reader of the file will get it back: the live dashboard folds
exactly what ``watch`` will read (STYLE.md, "one source of truth").
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

RECORD_FILES = ("metrics", "rounds", "devices", "events")
# The event that ends a run, by the run's final status (``summary.json``'s ``status``).
FINAL_EVENTS = {"completed": "run_completed", "failed": "run_failed", "interrupted": "interrupted"}

Subscriber = Callable[[str, dict[str, Any]], None]  # (record file's name, the record)


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null rather than as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _cut_torn_tail(path: Path) -> int:
    """Cut off a last line without its newline (a kill mid-write); how many bytes went.

    Such a line never held a whole record (the newline is the last byte written). A round's
    ``rounds.jsonl`` and ``metrics.jsonl`` lines are written before its checkpoint, so a resumed
    run records a torn one's round again. Left in place, the next line appended would extend it
    into a damaged line in the middle of the file.
    """
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            # A torn line is at most one record long: read back from the end to its start.
            back = min(size, 1 << 20)
            while True:
                f.seek(size - back)
                keep = f.read(back).rfind(b"\n")
                if keep >= 0 or back == size:
                    break
                back = min(size, back * 2)
            end = size - back + keep + 1  # keep == -1: the file is one torn line
            f.truncate(end)
            return size - end
    except FileNotFoundError:
        return 0


class RunRecords:
    """Writer of one run directory. Times in records are seconds since the run started."""

    def __init__(self, run_dir: Path, manifest_toml: str) -> None:
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        (self.dir / "manifest.toml").write_text(manifest_toml, encoding="utf-8")
        torn = {name: _cut_torn_tail(self.dir / f"{name}.jsonl") for name in RECORD_FILES}
        self._files: dict[str, IO[str]] = {
            name: open(self.dir / f"{name}.jsonl", "a", encoding="utf-8") for name in RECORD_FILES
        }
        self._subscribers: list[Subscriber] = []
        for name, cut in torn.items():
            if cut:
                self.event("torn_line", None, file=f"{name}.jsonl", bytes=cut)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def subscribe(self, fn: Subscriber) -> None:
        """Call ``fn(name, record)`` after each record is appended to ``<name>.jsonl``.

        ``record`` is the line parsed back (NaN and inf as None, tuples as lists, ...), shared
        by all subscribers, who must not change it. A subscriber's exception propagates to the
        writer's caller: it is a bug of ours, not something to hide.
        """
        self._subscribers.append(fn)

    def append(self, name: str, record: dict[str, Any]) -> None:
        f = self._files[name]
        try:  # the common case, no NaN or inf anywhere: no walk through the record first
            line = json.dumps(record, separators=(",", ":"), allow_nan=False)
        except ValueError:
            line = json.dumps(_clean(record), separators=(",", ":"))
        f.write(line + "\n")
        f.flush()
        if self._subscribers:
            written = json.loads(line)
            for fn in self._subscribers:
                fn(name, written)

    def event(self, event: str, device: str | None = None, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"t": round(self.elapsed(), 6), "event": event}
        if device is not None:
            record["device"] = device
        record.update(fields)
        self.append("events", record)
        return record

    def write_summary(self, summary: dict[str, Any]) -> None:
        path = self.dir / "summary.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(_clean(summary), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
