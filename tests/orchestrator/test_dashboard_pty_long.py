"""A whole run on an 80x24 terminal: a real 150-round local-fleet run under a pseudo-terminal,
cheap rounds (digits, small batches), and the screen it ends on still shows the trends."""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.config.manifest import local_device_toml
from tests.orchestrator.test_dashboard_log import trend_rows
from tests.orchestrator.test_dashboard_pty import SCALE, _Term, run_to_end

DEVICES = ("dev-a", "dev-b")
ROUNDS = 150

MANIFEST = f"""
[testbed]
name = "pty-long"
listen = "127.0.0.1:0"
join_timeout_s = 120.0

[training]
dataset = "digits"
rounds = {ROUNDS}
batch_size = 8
eval_every = 10
seed = 3

[data]
partition = "iid"
test_limit = 100
""" + "".join(
    # An emulated 40 ms RTT keeps a round above a few tens of milliseconds however fast the
    # machine: at 4 redraws a second, the log pane then shows each evaluation in some frame
    # (with 10 ms rounds, several scrolled past between two frames).
    "\n" + local_device_toml(d, f"tok-{d}", rtt_ms=40.0)
    for d in DEVICES
)


def test_trends_keep_their_rows_to_the_end_of_a_long_run(tmp_path: Path) -> None:
    manifest = tmp_path / "long.toml"
    manifest.write_text(MANIFEST)
    manifest.chmod(0o600)
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "orchestrator", "run", str(manifest), "--run-dir", str(run_dir)]
    term = _Term(argv, rows=24, cols=80, devices=DEVICES)
    (code,) = run_to_end([term], 240 * SCALE)
    screen = term.text
    assert code == 0, screen
    assert "COMPLETED" in screen and f"round {ROUNDS}/{ROUNDS}" in screen
    # Fifteen evaluations and every event of the run later, the log has not eaten the trends.
    assert trend_rows(screen) >= 3, screen
    assert "accuracy" in screen and "loss" in screen and "round" in screen
    # Every evaluation reached the log on its way (it ends on the run's last events).
    assert len(term.evals_seen) >= ROUNDS // 10 - 2, sorted(term.evals_seen)
    assert "None" not in screen
    # While it trained, the fleet table said the devices were computing.
    assert "computing" in term.statuses, term.statuses
