"""``gapsl-orchestrator watch RUN_DIR``: the dashboard of a run rebuilt from its records alone.

A run directory is the whole story of a run (README, "Run records"), so any terminal that can read
it can follow the run — while it is going, or after it ended. `RunWatcher` folds each record line
into a `RunSnapshot` once: a refresh stats the files and reads only the bytes appended since.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from orchestrator.config.manifest import Manifest, parse_manifest
from orchestrator.errors import ExitCode, ManifestError, RunError
from orchestrator.records.reader import finite
from orchestrator.ui.snapshot import (
    DeviceView,
    EvalPoint,
    EventLine,
    GapslView,
    RoundPoint,
    RunSnapshot,
)

__all__ = ["RunWatcher", "add_parser", "run_watch", "snapshot_from_records", "watch_live"]

FINAL_PHASES = ("completed", "failed", "interrupted")
_TELEMETRY_KEYS = (
    "compute_ms_per_sample", "cpu_percent", "mem_percent", "temp_c", "rtt_ms",
    "uplink_mbps", "downlink_mbps",
)  # fmt: skip
# Events that say where a device stands; the others (refused, bad_frame, ...) leave it as it was.
_STATUS_BY_EVENT = {"joined": "joined", "rejoined": "joined", "ready": "joined", "lost": "lost"}


def _num(value: Any) -> float:
    """A record's number as a float; null (NaN or inf when written) reads back as NaN."""
    v = finite(value)
    return math.nan if v is None else v


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


class _Fold:
    """What the dashboard shows, accumulated one record at a time."""

    def __init__(self, manifest: Manifest | None) -> None:
        self.m = manifest
        # Per device, the `DeviceView` fields the records tell.
        self.dev: dict[str, dict[str, Any]] = {}
        for d in manifest.devices if manifest is not None else ():
            self._add(d.id, d.launch, "" if d.device == "auto" else d.device)
        self.evals: list[EvalPoint] = []
        self.rounds: collections.deque[RoundPoint] = collections.deque(maxlen=200)
        self.events: collections.deque[EventLine] = collections.deque(maxlen=50)
        self.round = 0
        self.last_t = self.train_t0 = 0.0
        self.listen = ""
        self.gapsl: GapslView | None = None
        self.on_line: Callable[[str], None] | None = None

    def _add(self, dev: str, launch: str = "remote", torch_device: str = "") -> None:
        batch = self.m.training.batch_size if self.m is not None else 0
        self.dev[dev] = {
            "status": "waiting", "launch": launch, "torch_device": torch_device,
            "batch_size": batch,
        }  # fmt: skip

    def _device(self, dev: Any, admitted: bool = True) -> dict[str, Any] | None:
        if not isinstance(dev, str):
            return None
        if self.m is None and admitted and dev not in self.dev:
            self._add(dev)  # without a manifest, the fleet is whoever the records name
        return self.dev.get(dev)

    def event(self, rec: dict[str, Any]) -> None:
        t, name, raw = _num(rec.get("t")), str(rec.get("event", "?")), rec.get("device")
        self.last_t = max(self.last_t, t) if t == t else self.last_t
        d = self._device(raw, admitted=name in _STATUS_BY_EVENT)
        if name == "listening" and isinstance(rec.get("url"), str):
            self.listen = rec["url"].split("://", 1)[-1]
        if d is not None:
            if name in _STATUS_BY_EVENT:
                d["status"] = _STATUS_BY_EVENT[name]
                d.update(
                    {k: rec[k] for k in ("hostname", "platform") if isinstance(rec.get(k), str)}
                )
            elif name == "agent_exited" and rec.get("code") == 0:
                # Other codes say nothing new: a crash mid-run also closes the link ("lost"),
                # and agents stopped after the run's goodbye are as done as those that left.
                d["status"] = "done"
            elif name == "profiled":
                self.telemetry(rec)
            if name == "ready":
                d["shard_size"] = int(finite(rec.get("shard_size")) or 0)
                self.train_t0 = max(self.train_t0, t if t == t else 0.0)
        if name == "run_completed":
            # The orchestrator says goodbye to every connected device (engine: _say_bye).
            for v in self.dev.values():
                v["status"] = "done" if v["status"] == "joined" else v["status"]
        text = " ".join(f"{k}={v}" for k, v in rec.items() if k not in ("t", "event", "device"))
        line = EventLine(t, name, raw if isinstance(raw, str) else None, text)
        self.events.append(line)
        if self.on_line is not None:
            from orchestrator.ui.render import format_event

            self.on_line(format_event(line))

    def metric(self, rec: dict[str, Any]) -> None:
        r = rec.get("round")
        if not isinstance(r, int) or isinstance(r, bool):
            return
        keys = ("time_s", "acc_mean", "acc_min", "acc_max", "loss")
        point = EvalPoint(r, *(_num(rec.get(k)) for k in keys))
        self.evals.append(point)
        for dev, acc in (rec.get("acc") or {}).items():
            d = self._device(dev)
            if d is not None:
                d["accuracy"] = _num(acc)
        if self.on_line is not None:
            from orchestrator.ui.render import format_eval

            self.on_line(format_eval(point, self.total_rounds(r)))

    def round_record(self, rec: dict[str, Any]) -> None:
        r = rec.get("round")
        if not isinstance(r, int) or isinstance(r, bool):
            return
        self.round = r
        devs = {k: v for k, v in (rec.get("devices") or {}).items() if isinstance(v, dict)}
        for dev, x in devs.items():
            d = self._device(dev)
            if d is None:
                continue
            if d["status"] == "waiting":  # in-process runs record no joins
                d["status"] = "joined"
            d["rounds_done"] = r
            d["batch_size"] = batch = int(finite(x.get("batch")) or 0)
            compute, loss = finite(x.get("compute_s")), finite(x.get("loss"))
            if compute is not None:
                d["compute_ms_per_sample"] = 1000.0 * compute / max(batch, 1)
            if loss is not None:
                d["last_loss"] = loss
        slowest = max(devs.values(), key=lambda x: finite(x.get("wait_s")) or 0.0, default={})
        self.rounds.append(
            RoundPoint(
                round=r, round_time_s=_num(rec.get("round_time_s")), loss=_num(rec.get("loss")),
                predicted_s=finite(rec.get("predicted_s")),
                compute_s=finite(slowest.get("compute_s")) or 0.0,
                uplink_s=finite(slowest.get("uplink_s")) or 0.0,
                server_s=finite(rec.get("server_s")) or 0.0,
                downlink_s=finite(rec.get("downlink_s")) or 0.0,
            )
        )  # fmt: skip
        leaders, cos = rec.get("leaders"), rec.get("cos")
        if isinstance(leaders, list) and isinstance(cos, list) and cos:
            # The cosine matrix is over the whole group, in the manifest's device order.
            order = list(self.dev) if len(self.dev) == len(cos) else list(devs)
            if len(order) != len(cos):
                order = [f"#{k + 1}" for k in range(len(cos))]
            self.gapsl = GapslView(
                leaders=tuple(str(x) for x in leaders),
                cosine=tuple(tuple(_num(v) for v in row) for row in cos),
                device_ids=tuple(order),
                align_before=finite(rec.get("align_before")),
                align_after=finite(rec.get("align_after")),
            )

    def telemetry(self, rec: dict[str, Any]) -> None:
        """A ``devices.jsonl`` line, or a ``profiled`` event: the measurements it carries."""
        d = self._device(rec.get("device"))
        if d is not None:
            # Compute time measured in the rounds, when there are any, is what the live view shows.
            keys = _TELEMETRY_KEYS[1:] if "rounds_done" in d else _TELEMETRY_KEYS
            d.update({k: finite(rec[k]) for k in keys if k in rec})

    def total_rounds(self, fallback: int = 0) -> int:
        return self.m.training.rounds if self.m is not None else max(self.round, fallback)

    def views(self) -> tuple[DeviceView, ...]:
        return tuple(DeviceView(id=i, **d) for i, d in self.dev.items())


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
        self.fold = _Fold(self.manifest)
        self.fold.on_line = self.on_line
        names = ("events", "devices", "rounds", "metrics")
        self.tails = {n: _Tail(self.dir / f"{n}.jsonl") for n in names}
        self.summary: dict[str, Any] = {}
        self._summary_key: tuple[int, int] | None = None

    @property
    def bytes_read(self) -> int:
        """Record bytes read so far: a refresh of unchanged files adds nothing."""
        return sum(t.bytes_read for t in self.tails.values())

    def refresh(self) -> None:
        """Fold the records appended since the last refresh, and re-read a changed summary."""
        self.fold.on_line = self.on_line
        # The summary first: every record line was flushed before it was written, so a final
        # status never shows with records still missing from the frame.
        self._read_summary()
        new: dict[str, list[dict[str, Any]]] = {}
        for name, tail in self.tails.items():
            got = tail.read_new()
            if got is None:  # records are append-only; a rewritten file means a fresh start
                self._restart()
                self.refresh()
                return
            new[name] = got
        f = self.fold
        for rec in new["devices"]:
            f.telemetry(rec)
        for rec in new["rounds"]:  # before events, so "run_completed" finds every participant
            f.round_record(rec)
        # Events and evaluations interleaved in time order, as the headless log printed them.
        timed = [(_num(r.get("t")), 0, r) for r in new["events"]]
        timed += [(_num(r.get("time_s")), 1, r) for r in new["metrics"]]
        timed.sort(key=lambda x: x[0] if x[0] == x[0] else math.inf)
        for _, kind, rec in timed:
            (f.metric if kind else f.event)(rec)

    def _read_summary(self) -> None:
        path = self.dir / "summary.json"
        try:
            st = path.stat()
        except FileNotFoundError:
            self.summary, self._summary_key = {}, None
            return
        key = (st.st_size, st.st_mtime_ns)
        if key == self._summary_key:
            return
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # replaced atomically by the writer, so this is a passing state at worst
        self.summary = summary if isinstance(summary, dict) else {}
        self._summary_key = key

    @property
    def status(self) -> str:
        """The run's final status from ``summary.json``, or ``""`` while it has none."""
        status = self.summary.get("status")
        return status if status in FINAL_PHASES else ""

    def snapshot(self) -> RunSnapshot:
        """Refresh, then freeze everything the dashboard shows."""
        self.refresh()
        f, m, s = self.fold, self.manifest, self.summary
        ready = bool(f.dev) and all("shard_size" in d for d in f.dev.values())
        phase = self.status or ("training" if f.rounds or ready else "waiting")
        if self.status:
            elapsed = max(finite(s.get("wall_s")) or 0.0, f.last_t)
        else:
            elapsed = max(time.time() - self.started_wall, f.last_t)
        total = f.total_rounds(int(finite(s.get("rounds")) or 0))
        eta = None
        if f.round > 0 and phase not in ("failed", "interrupted"):
            eta = max(elapsed - f.train_t0, 0.0) / f.round * max(total - f.round, 0)
        message = str(s.get("error", "")) or self.manifest_error
        skipped = sum(t.skipped for t in self.tails.values())
        if not message and skipped:
            message = f"{skipped} damaged record line(s) skipped"
        if m is not None:
            d = m.data
            alpha = d.alpha if d.partition == "dirichlet" else None
            ident = (m.testbed.name, m.training.algorithm, m.training.dataset, d.partition)
        else:
            alpha, name = None, self.dir.resolve().name
            ident = (name, str(s.get("algorithm", "?")), str(s.get("dataset", "?")), "?")
        return RunSnapshot(
            *ident,
            alpha=alpha,
            listen=f.listen or (m.testbed.listen if m is not None else ""),
            phase=phase,
            round=f.round,
            rounds=total,
            elapsed_s=elapsed,
            eta_s=eta,
            devices=f.views(),
            evals=tuple(f.evals),
            recent_rounds=tuple(f.rounds),
            events=tuple(f.events),
            gapsl=f.gapsl,
            run_dir=str(self.dir),
            message=message,
        )


def snapshot_from_records(run_dir: Path) -> RunSnapshot:
    """The dashboard's view of the run directory at ``run_dir``, from its records alone."""
    return RunWatcher(run_dir).snapshot()


# --- the command ---------------------------------------------------------------------------


async def watch_live(watcher: RunWatcher, console: Any, refresh_hz: float) -> str:
    """Redraw the dashboard until the run's summary shows a final status; return that status.

    The last frame is drawn after the status appears. Cancelling is safe (the `Live` context
    restores the terminal).
    """
    from orchestrator.ui.render import LiveDashboard

    stop = asyncio.Event()

    def snap() -> RunSnapshot:
        s = watcher.snapshot()
        if s.phase in FINAL_PHASES:
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
            "appended, until summary.json shows the run ended (or Ctrl-C). When stdout is not a "
            "terminal, prints one log line per event and evaluation instead. Exits with the "
            "run's status: 0 completed, 1 failed, 130 interrupted (or Ctrl-C)."
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
        return ExitCode.OK
    try:
        if sys.stdout.isatty() and os.environ.get("TERM") != "dumb":
            status = asyncio.run(watch_live(watcher, Console(), hz))
        else:
            status = _follow_lines(watcher, hz)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return ExitCode.INTERRUPTED
    codes = {"failed": ExitCode.FAILED, "interrupted": ExitCode.INTERRUPTED}
    return codes.get(status, ExitCode.OK)
