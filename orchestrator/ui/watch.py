"""``gapsl-orchestrator watch RUN_DIR``: the dashboard of a run rebuilt from its records alone.

A run directory is the whole story of a run (README, "Run records"), so any terminal that can read
it can follow the run — while it is going, or after it ended. `RunWatcher` tails the record files
into the same `RunFold` the live dashboard uses: a refresh stats the files and reads only the
bytes appended since.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import heapq
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from orchestrator.config.manifest import Manifest, parse_manifest
from orchestrator.errors import ExitCode, ManifestError, RunError
from orchestrator.names import Phase
from orchestrator.records.reader import RECORD_NAMES, finite
from orchestrator.ui.fold import RunFold
from orchestrator.ui.snapshot import RunSnapshot

__all__ = [
    "RunWatcher",
    "add_parser",
    "read_records",
    "run_watch",
    "snapshot_from_records",
    "watch_live",
]

_READ_ORDER = ("events", "devices", "rounds", "metrics")


def _time(value: Any) -> float:
    """A record's time for ordering; a missing one sorts last."""
    v = finite(value)
    return math.inf if v is None else v


class _Tail:
    """The records appended to one JSONL file since the last call, whole lines only.

    A line still being written (no newline yet) is left for the next call, unless it already
    parses as a JSON object: an object's last byte closes it, so a cut-short one never parses.
    A damaged line is counted in `skipped` and passed over: a viewer keeps showing the rest.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.skipped = 0
        self.bytes_read = 0
        self._key: tuple[int, int, int] | None = None

    def read_new(self) -> list[dict[str, Any]] | None:
        """New records; None when the file shrank or was replaced (the reader must restart)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key == self._key:
            return []
        if self._key is not None and (st.st_ino != self._key[0] or st.st_size < self.offset):
            return None
        self._key = key
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.bytes_read += len(data)
        *whole, rest = data.split(b"\n")
        out: list[dict[str, Any]] = []
        for line in whole:
            self.offset += len(line) + 1
            rec = self._parse(line)
            if rec is not None:
                out.append(rec)
            elif line.strip():
                self.skipped += 1
        last = self._parse(rest)
        if last is not None:
            self.offset += len(rest)
            out.append(last)
        return out

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            rec = json.loads(line.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            return None
        return rec if isinstance(rec, dict) else None


class _Folds(Protocol):
    def add(self, name: str, record: dict[str, Any]) -> None: ...


def read_records(run_dir: Path, fold: _Folds) -> None:
    """Fold every record already in ``run_dir`` (a resumed run's live view starts from them;
    so do its metrics, ``prometheus.py``)."""
    for name in RECORD_NAMES:
        for rec in _Tail(run_dir / f"{name}.jsonl").read_new() or []:
            fold.add(name, rec)


class RunWatcher:
    """Follows one run directory; `snapshot()` re-reads only what changed since the last call.

    Raises RunError when ``run_dir`` holds no ``manifest.toml`` (the first file a run writes).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        manifest_path = self.dir / "manifest.toml"
        if not manifest_path.is_file():
            raise RunError(f"{self.dir}: not a run directory (no manifest.toml)")
        self.started_wall = manifest_path.stat().st_mtime  # written as the run's clock starts
        self.manifest_error = ""
        try:
            text = manifest_path.read_text(encoding="utf-8")
            self.manifest: Manifest | None = parse_manifest(
                text, source=str(manifest_path), base_dir=self.dir
            )
        except (OSError, UnicodeDecodeError, ManifestError) as exc:
            self.manifest, self.manifest_error = None, str(exc)
        self.on_line: Callable[[str], None] | None = None
        self._restart()

    def _restart(self) -> None:
        self.fold = RunFold(self.manifest, str(self.dir))
        self.fold.on_line = self.on_line
        # events.jsonl first: its final event is written after every other record of the run,
        # so when a refresh reads it, the files read after it hold all that came before.
        self.tails = {n: _Tail(self.dir / f"{n}.jsonl") for n in _READ_ORDER}

    @property
    def bytes_read(self) -> int:
        """Record bytes read so far: a refresh of unchanged files adds nothing."""
        return sum(t.bytes_read for t in self.tails.values())

    def refresh(self) -> None:
        """Fold the records appended since the last refresh."""
        self.fold.on_line = self.on_line
        new: dict[str, list[dict[str, Any]]] = {}
        for name, tail in self.tails.items():
            got = tail.read_new()
            if got is None:  # records are append-only; a rewritten file means a fresh start
                self._restart()
                self.refresh()
                return
            new[name] = got
        f = self.fold
        for name in ("devices", "rounds"):
            for rec in new[name]:
                f.add(name, rec)

        # Events and evaluations interleaved in time order, as the headless log printed them
        # (the fold's state does not depend on this order, only the printed lines do). A merge,
        # not a sort: each file keeps its own order, which is what says that a resumed run's
        # repeated evaluation replaces the earlier copy, whatever their clocks say.
        def timed(name: str, key: str) -> list[tuple[float, str, dict[str, Any]]]:
            return [(_time(r.get(key)), name, r) for r in new[name]]

        merged = heapq.merge(timed("events", "t"), timed("metrics", "time_s"), key=lambda x: x[0])
        for _, name, rec in merged:
            f.add(name, rec)

    @property
    def status(self) -> str:
        """The run's final status (its final event), or ``""`` while it has none."""
        return str(self.fold.phase) if self.fold.phase.final else ""

    def snapshot(self) -> RunSnapshot:
        """Refresh, then freeze everything the dashboard shows."""
        self.refresh()
        snap = self.fold.snapshot(time.time() - self.started_wall)
        message = snap.message or self.manifest_error
        skipped = sum(t.skipped for t in self.tails.values())
        if not message and skipped:
            message = f"{skipped} damaged record line(s) skipped"
        if self.manifest is None:  # the summary, if any, still names what ran
            s = _summary(self.dir)
            algorithm, dataset = (str(s.get(k, "?")) for k in ("algorithm", "dataset"))
            snap = dataclasses.replace(snap, algorithm=algorithm, dataset=dataset)
        return dataclasses.replace(snap, message=message)


def _summary(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def snapshot_from_records(run_dir: Path) -> RunSnapshot:
    """The dashboard's view of the run directory at ``run_dir``, from its records alone."""
    return RunWatcher(run_dir).snapshot()


# --- the command ---------------------------------------------------------------------------


async def watch_live(watcher: RunWatcher, console: Any, refresh_hz: float) -> str:
    """Redraw the dashboard until the records show a final status; return that status.

    The last frame is drawn after the status appears. Cancelling is safe (the `Live` context
    restores the terminal).
    """
    from orchestrator.ui.live import LiveDashboard

    stop = asyncio.Event()

    def snap() -> RunSnapshot:
        s = watcher.snapshot()
        if Phase(s.phase).final:
            stop.set()  # LiveDashboard then draws this final frame once more and returns
        return s

    await LiveDashboard(console, refresh_hz, snap).run(stop)
    return watcher.status


def _follow_lines(watcher: RunWatcher, refresh_hz: float) -> str:
    """Headless: print each event and evaluation as a log line, until the run ends."""
    watcher.on_line = lambda line: print(line, flush=True)
    while True:
        watcher.refresh()
        if watcher.status:
            return watcher.status
        # Plain files give no change notification without extra dependencies, so poll.
        time.sleep(1.0 / refresh_hz)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``watch`` command (its handler is ``run_watch``, also set as ``func``)."""
    p = sub.add_parser(
        "watch",
        help="show the dashboard of a run directory, live while the run goes on",
        description=(
            "Show the dashboard of a run from its run directory alone, refreshed as records are "
            "appended, until the records show the run ended (or Ctrl-C). When stdout is not a "
            "terminal, prints one log line per event and evaluation instead. Exits with the "
            "run's status: 0 completed, 1 failed, 130 interrupted (or Ctrl-C); with --once, "
            "3 while the run has not ended."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--once", action="store_true", help="print one plain frame and exit")
    p.add_argument("--refresh-hz", type=float, default=None, help="default: the run's manifest")
    p.add_argument("--width", type=int, default=None, help="frame width (default: terminal)")
    p.add_argument("--height", type=int, default=None, help="frame height (default: terminal)")
    p.set_defaults(func=run_watch)


def run_watch(args: argparse.Namespace) -> int:
    """Handle ``watch``; a RunError (not a run directory) propagates."""
    from rich.console import Console

    from orchestrator.ui.render import render

    watcher = RunWatcher(args.run_dir)
    hz = args.refresh_hz
    if hz is None:
        hz = watcher.manifest.dashboard.refresh_hz if watcher.manifest is not None else 4.0
    if not hz > 0:
        print("gapsl-orchestrator watch: --refresh-hz must be > 0", file=sys.stderr)
        return ExitCode.USAGE
    size = shutil.get_terminal_size((120, 40))
    width, height = args.width or size.columns, args.height or size.lines
    if args.once:
        snap = watcher.snapshot()
        console = Console(
            file=sys.stdout, width=width, height=height, color_system=None, force_terminal=False
        )
        console.print(render(snap, width, height))
        return exit_code_of(watcher.status)
    try:
        if sys.stdout.isatty() and os.environ.get("TERM") != "dumb":
            status = asyncio.run(watch_live(watcher, Console(), hz))
        else:
            status = _follow_lines(watcher, hz)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return ExitCode.INTERRUPTED
    return exit_code_of(status)


_STATUS_CODES: dict[str, ExitCode] = {
    Phase.COMPLETED: ExitCode.OK,
    Phase.FAILED: ExitCode.FAILED,
    Phase.INTERRUPTED: ExitCode.INTERRUPTED,
}


def exit_code_of(status: str) -> ExitCode:
    """``watch``'s exit status for a run's final status; ``""`` (no final record) is
    INCOMPLETE, so a script can tell a run that ended well from one still going or killed."""
    return _STATUS_CODES.get(status, ExitCode.INCOMPLETE)  # str enums: keyed by the word
