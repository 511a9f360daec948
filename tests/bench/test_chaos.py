"""bench.chaos in its --quick configuration: a minute of faults, the orchestrator's kill and
``run --resume`` included, and nothing lost.

Real processes throughout: the orchestrator (``python -m orchestrator run``), three local agents
that are SIGKILLed, stalled with SIGSTOP and have their connections cut, and the reference run
in ``simulate``. Which faults strike is random (seeded), but the kinds that must be there are
asserted, so a soak that silently injects nothing fails.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from bench import _chaos_faults, chaos


def test_quick_soak_survives_every_fault_and_loses_no_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = chaos.main(["--quick", "--seed", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["findings"] == [], "\n".join(out[:-1])
    assert code == 0 and summary["ok"] is True
    faults = summary["faults"]
    assert faults.get("orchestrator_kill") == 1
    assert sum(faults.get(k, 0) for k in chaos.KINDS) >= 3, faults
    assert summary["survived"] == summary["faults_total"]
    checks = summary["checks"]
    assert summary["lost_records"] == 0 and summary["torn_lines"] == 0
    assert checks["missing_rounds"] == [] and checks["missing_evals"] == []
    # The orchestrator is killed past its checkpoint: the resume records some rounds again.
    assert checks["repeated_rounds"] >= 1
    assert checks["wrongly_marked"] == 0 and checks["repeats_as_said"]
    assert checks["reader_keeps_later"] and checks["status"] == "interrupted"
    assert summary["rounds"] >= chaos.EVAL_EVERY and summary["reference_acc_mean"] is not None
    # Faults send devices back to checkpoints, so the two runs differ, but not by much.
    assert abs(summary["acc_diff"]) < 0.1, summary


@pytest.mark.parametrize("with_ss", [True, False], ids=["ss-K", "pidfd-shutdown"])
def test_a_cut_link_ends_both_sides_while_both_processes_live(
    with_ss: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not with_ss:  # the fallback, as on a host where ss -K is not allowed
        monkeypatch.setattr(_chaos_faults, "_ss_kill", lambda conn, port: False)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        peer = (  # it reports its link's end, then stays alive until killed
            f"import socket, time\nc = socket.create_connection(('127.0.0.1', {port}))\n"
            "try:\n    c.recv(1)\nexcept OSError:\n    pass\nprint('cut', flush=True)\n"
            "time.sleep(60)\n"
        )
        child = subprocess.Popen([sys.executable, "-c", peer], stdout=subprocess.PIPE)
        try:
            server.settimeout(30)
            conn, _ = server.accept()
            with conn:
                how = None
                end = time.monotonic() + 30  # until the child's connection is in its table
                while how is None and time.monotonic() < end:
                    how = _chaos_faults.cut_link(child.pid, port)
                # ss -K may not be allowed here: then the fallback did it
                assert how in (("rst", "shutdown") if with_ss else ("shutdown",))
                assert child.stdout is not None
                assert child.stdout.readline().strip() == b"cut"
                assert child.poll() is None
                conn.settimeout(30)
                try:
                    assert conn.recv(1) == b""  # a FIN ...
                except ConnectionResetError:
                    pass  # ... or a RST: either way the orchestrator's side is cut too
        finally:
            child.kill()
            child.wait()
