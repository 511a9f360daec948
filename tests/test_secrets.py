"""Device tokens stay secret: off the agents' command lines, out of every record and log.

A real local fleet run through the command line, with a manifest file that every user of the
host can read: the run warns about that once, no local agent carries its token on its command
line (``/proc/PID/cmdline`` is readable by everyone), and no file of the run directory — records,
the stored manifest, the agents' logs and checkpoints — nor the orchestrator's output holds any
token. The agents' token files are private while the run lasts and gone after it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config.manifest import load_manifest, local_device_toml
from orchestrator.config.secrets import exposed_warning

from .local_agents import agents_of

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
TOKENS = {i: f"tok-{i}-5f0c9e2d71" for i in ("a", "b")}
MANIFEST = """
[testbed]
listen = "127.0.0.1:0"
[training]
rounds = 30
eval_every = 15
"""
MANIFEST += "".join(local_device_toml(i, t) for i, t in TOKENS.items())


def test_tokens_stay_out_of_command_lines_records_and_logs(tmp_path: Path) -> None:
    manifest = tmp_path / "testbed.toml"
    manifest.write_text(MANIFEST)
    manifest.chmod(0o644)  # readable by every user of the host: worth a warning
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(manifest), "--run-dir", str(run)]
        + ["--no-dashboard"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        end = time.monotonic() + 120 * SCALE
        agents = agents_of(run)
        while len(agents) < len(TOKENS):
            assert proc.poll() is None and time.monotonic() < end, "no agents started"
            time.sleep(0.1)
            agents = agents_of(run)
        token_files = []
        for agent in agents:
            cmdline = Path(f"/proc/{agent.pid}/cmdline").read_bytes()
            assert not any(t.encode() in cmdline for t in TOKENS.values())
            args = cmdline.split(b"\0")
            token_file = Path(args[args.index(b"--token-file") + 1].decode())
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
            assert run not in token_file.parents
            token_files.append(token_file)
        out, err = proc.communicate(timeout=240 * SCALE)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    for token in TOKENS.values():
        assert token.encode() not in out + err
        leaks = [p for p in run.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
        assert not leaks, f"{token} found in {leaks}"
    assert not any(f.exists() or f.parent.exists() for f in token_files)
    assert len(list((run / "agents").glob("*.log"))) == len(TOKENS)
    events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
    warnings = [e for e in events if e["event"] == "tokens_exposed"]
    assert len(warnings) == 1 and str(manifest.resolve()) in warnings[0]["why"]
    assert b"tokens_exposed" in out  # the headless log line says it too


def test_a_private_manifest_is_not_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "testbed.toml"
    manifest.write_text(MANIFEST)
    manifest.chmod(0o600)
    assert exposed_warning(load_manifest(manifest)) is None
    assert main(["check", str(manifest)]) == 0 and "warning" not in capsys.readouterr().err
    manifest.chmod(0o640)
    assert "chmod 600" in (exposed_warning(load_manifest(manifest)) or "")
    assert main(["check", str(manifest)]) == 0 and "chmod 600" in capsys.readouterr().err
