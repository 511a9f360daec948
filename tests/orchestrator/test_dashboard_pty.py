"""The live dashboard as a user sees it: a real run of three local agents inside a pseudo-terminal,
its output replayed through a terminal emulator, and the screen read back."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.config.manifest import local_device_toml
from orchestrator.ui.watch import snapshot_from_records

pyte = pytest.importorskip("pyte")

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
ROWS, COLS = 40, 120
DEVICES = ("dev-a", "dev-b", "dev-c")

MANIFEST = """
[testbed]
name = "pty-view"
listen = "127.0.0.1:0"
join_timeout_s = 120.0

[training]
dataset = "digits"
rounds = 60
eval_every = 10
seed = 2

[data]
partition = "iid"
test_limit = 300
""" + "".join("\n" + local_device_toml(d, f"tok-{d}") for d in DEVICES)


# `watch` through its own parser, so the test does not depend on how the CLI registers it.
WATCH = (
    "import argparse, sys; from orchestrator.ui.watch import add_parser; "
    "p = argparse.ArgumentParser(); add_parser(p.add_subparsers()); "
    "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))"
)


class _Term:
    """A process on the slave side of a fresh pty (40x120 unless told), and the screen its
    output draws."""

    def __init__(
        self,
        argv: list[str],
        rows: int = ROWS,
        cols: int = COLS,
        devices: tuple[str, ...] = DEVICES,
    ) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = dict(os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        # One torch thread in the orchestrator: on two cores shared with three agents, more
        # threads only contend (the agents already run with one each).
        env["OMP_NUM_THREADS"] = "1"
        try:
            self.proc = subprocess.Popen(
                argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                start_new_session=True,  # its own process group, so a timeout can stop all of it
            )  # fmt: skip
        finally:
            os.close(slave)  # the child holds its own copy; EIO on the master means it is gone
        os.set_blocking(master, False)
        self.master = master
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.open = True
        self.devices = devices
        self.rounds_seen: list[int] = []  # the round counter whenever the whole fleet shows
        self.statuses: set[str] = set()  # every status the fleet table has shown
        self.evals_seen: set[int] = set()  # every evaluation the event log has shown

    def pump(self) -> None:
        """Feed what the process wrote to the screen, and note the round counter."""
        try:
            data = os.read(self.master, 1 << 16)
        except BlockingIOError:
            return
        except OSError:  # EIO: every writer on the slave side has exited
            data = b""
        if not data:
            self.open = False
            return
        self.stream.feed(data)
        text = self.text
        found = re.search(r"round (\d+)/\d+", text)
        if found and all(d in text for d in self.devices):
            self.rounds_seen.append(int(found.group(1)))
        for d in self.devices:
            self.statuses.update(re.findall(rf"│ {re.escape(d)}\s+(\w+)", text))
        self.evals_seen.update(int(r) for r in re.findall(r"eval\s+round (\d+) acc", text))

    @property
    def text(self) -> str:
        return "\n".join(self.screen.display)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the orchestrator stops its agents
            try:
                self.proc.wait(10 * SCALE)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        os.close(self.master)


def run_to_end(
    terms: list[_Term], limit_s: float, tick: Callable[[], None] = lambda: None
) -> list[int]:
    """Pump every terminal until all their processes have exited; their exit codes. ``tick``
    runs before each wait (it may add terminals)."""
    deadline = time.monotonic() + limit_s
    try:
        while any(t.open for t in terms) and time.monotonic() < deadline:
            tick()
            live = [t for t in terms if t.open]
            ready, _, _ = select.select([t.master for t in live], [], [], 0.5)
            for t in live:
                if t.master in ready:
                    t.pump()
                elif t.proc.poll() is not None:
                    t.pump()  # nothing was pending: drain whatever is left, then stop
        if any(t.open for t in terms):
            screens = "\n\n".join(t.text for t in terms)
            pytest.fail(f"still running after {limit_s:.0f}s; screens:\n{screens}")
        return [t.proc.wait(30 * SCALE) for t in terms]
    finally:
        for t in terms:
            t.close()


def _advanced(term: _Term) -> bool:
    seen = sorted(set(term.rounds_seen))
    return len(seen) >= 2 and seen[0] < seen[-1]


def test_live_dashboard_and_watch_on_a_pty(tmp_path: Path) -> None:
    manifest = tmp_path / "pty.toml"
    manifest.write_text(MANIFEST)
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "orchestrator", "run", str(manifest), "--run-dir", str(run_dir)]
    terms = [_Term(argv)]

    def follow() -> None:
        # A second terminal follows the same run from its records once they exist.
        if len(terms) == 1 and (run_dir / "manifest.toml").exists():
            terms.append(_Term([sys.executable, "-c", WATCH, "watch", str(run_dir)]))

    codes = run_to_end(terms, 120 * SCALE, follow)
    run, watch = terms[0], terms[1] if len(terms) > 1 else None
    assert codes[0] == 0, run.text
    assert _advanced(run), (run.rounds_seen, run.text)
    assert "COMPLETED" in run.text and "round 60/60" in run.text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 60

    # `watch` followed the run as it went, and stopped on its own after the final frame.
    assert watch is not None and codes[1] == 0, watch.text if watch else ""
    assert _advanced(watch), (watch.rounds_seen, watch.text)
    assert "COMPLETED" in watch.text and "round 60/60" in watch.text

    # ... and reads the same run back from its records: a real fleet's joins, readies, port.
    snap = snapshot_from_records(run_dir)
    assert (snap.phase, snap.round, snap.rounds) == ("completed", 60, 60)
    assert [(d.id, d.status) for d in snap.devices] == [(d, "done") for d in DEVICES]
    assert all(d.shard_size > 0 and d.rounds_done == 60 for d in snap.devices)
    assert [e.round for e in snap.evals] == [10, 20, 30, 40, 50, 60]
    assert snap.evals[-1].acc_mean == summary["final_acc_mean"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", snap.listen) and snap.listen != "127.0.0.1:0"
    assert snap.listen in run.text and snap.listen in watch.text
