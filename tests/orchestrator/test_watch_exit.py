"""``watch`` as scripts use it: ``--once`` exits with the run's status (INCOMPLETE while it has
none), and a reader that goes away (``watch RUN | head -1``) ends it without a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.errors import ExitCode
from orchestrator.ui.snapshot import RunSnapshot
from tests.orchestrator.test_watch import _cut_final_event, finished  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]


def _with_final(run_dir: Path, event: str) -> None:
    """Make the run's final event ``event`` (as a failed or interrupted run writes it)."""
    final = _cut_final_event(run_dir)
    record = json.loads(final)
    record["event"] = event
    with open(run_dir / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


@pytest.mark.parametrize(
    ("final", "code"),
    [
        ("run_completed", ExitCode.OK),
        ("run_failed", ExitCode.FAILED),
        ("interrupted", ExitCode.INTERRUPTED),
        (None, ExitCode.INCOMPLETE),
    ],
)
def test_once_exits_with_the_run_status(
    finished: tuple[Path, RunSnapshot],  # noqa: F811
    final: str | None,
    code: ExitCode,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    if final is None:
        _cut_final_event(run_dir)  # killed: no final record
    elif final != "run_completed":
        _with_final(run_dir, final)
    assert main(["watch", str(run_dir), "--once", "--width", "100"]) == code
    assert "round 20/20" in capsys.readouterr().out


def test_a_reader_that_goes_away_ends_watch_quietly(
    finished: tuple[Path, RunSnapshot],  # noqa: F811
    tmp_path: Path,
) -> None:
    """``watch RUN | head -1`` on a run still going: the reader leaves after one line, and the
    next line watch prints meets a closed pipe."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    final = json.loads(_cut_final_event(run_dir))  # still going, as far as its records say
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "watch", str(run_dir), "--refresh-hz", "20"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.readline().startswith("event=preparing")
        proc.stdout.close()  # what head does after its one line
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            # the run goes on: every new event is a line for watch to print
            with open(run_dir / "events.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({**final, "event": "waiting", "missing": "a"}) + "\n")
            time.sleep(0.1)
        assert proc.poll() is not None, "watch kept going after its reader left"
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert "Traceback" not in err and "BrokenPipe" not in err and err == "", err
    assert proc.returncode == ExitCode.FAILED
