"""No port collisions: a manifest whose devices are all local listens on a free port unless it
sets testbed.listen, so two runs of the default manifest on one host both complete; the header
names the address only once it is bound, with the real port."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.ui.fold import RunFold
from orchestrator.ui.render import render
from orchestrator.ui.watch import snapshot_from_records

ROOT = Path(__file__).resolve().parents[2]
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
SMALL = ["training.rounds=6", "training.eval_every=3", "data.test_limit=200"]


def _text(snap: object, width: int = 160) -> str:
    console = Console(width=width, file=None, color_system=None, record=True)
    with console.capture() as cap:
        console.print(render(snap, width, 30))  # type: ignore[arg-type]
    return cap.get()


def test_two_runs_of_the_default_manifest_at_once_both_complete(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "orchestrator", "run", str(ROOT / "testbed.toml")]
    argv += ["--no-dashboard"] + [f"--set={item}" for item in SMALL]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Same working directory, so the same runs/ folder and, started within one second, the
    # same default run directory name: each run must claim a directory of its own.
    procs = [
        subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300 * SCALE)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    urls = [re.search(r"url=(ws://127\.0\.0\.1:(\d+))", out) for out in outs]
    assert all(urls), outs
    ports = {int(u.group(2)) for u in urls if u}
    assert len(ports) == 2 and 0 not in ports and 8765 not in ports
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        # what watch (and the live view: the same fold) shows is the bound address
        listen = snapshot_from_records(run).listen
        assert int(listen.rpartition(":")[2]) in ports
        assert f"serving ws://{listen}" in _text(snapshot_from_records(run))


def test_the_header_shows_no_address_before_one_is_bound() -> None:
    m = parse_manifest(
        '[[devices]]\nid = "a"\ntoken = "t"\nlaunch = "local"\n', source="testbed.toml"
    )
    assert m.testbed.listen == "127.0.0.1:0"
    fold = RunFold(m, "runs/x")
    before = fold.snapshot(1.0)
    assert before.listen == "" and "serving" not in _text(before)
    fold.add("events", {"t": 0.5, "event": "listening", "url": "ws://127.0.0.1:40123"})
    after = fold.snapshot(1.0)
    assert after.listen == "127.0.0.1:40123"
    assert "serving ws://127.0.0.1:40123" in _text(after)
    assert "serving" not in _text(dataclasses.replace(after, listen="in-process"))


def test_a_port_taken_after_the_preflight_fails_the_run_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        text = f'[testbed]\nlisten = "127.0.0.1:{taken}"\n[[devices]]\nid = "a"\ntoken = "t"\n'
        m = parse_manifest(text, source="m.toml")
        engine = Engine(m, tmp_path / "run", manifest_to_toml(m), run_id="taken")
        assert asyncio.run(asyncio.wait_for(engine.run(), 60 * SCALE)) == "failed"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["error"].startswith(f"m.toml: [testbed].listen: 127.0.0.1:{taken} is already")
