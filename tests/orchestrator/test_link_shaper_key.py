"""``testbed.link_shaper``: "kernel" where the kernel cannot shape is one line naming the key,
exit 2, from ``check`` and ``run`` alike and before a run directory exists; a value that is
neither shaper is refused the same way; a fleet with nothing to shape needs no namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config.manifest import local_device_toml
from orchestrator.errors import ExitCode
from orchestrator.fleet import netns


def _manifest(tmp_path: Path, shaper: str, **emulate: float) -> Path:
    text = f'[testbed]\nruns_dir = "{tmp_path / "runs"}"\nlink_shaper = "{shaper}"\n'
    text += "[training]\nrounds = 1\neval_every = 1\n"
    text += local_device_toml("a", "ta") + local_device_toml("b", "tb", **emulate)
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_kernel_shaping_without_root_is_refused_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    path = _manifest(tmp_path, "kernel", uplink_mbps=5.0)
    run_dir = tmp_path / "run"
    for argv in (
        ["check", str(path)],
        ["run", str(path), "--no-dashboard", "--run-dir", str(run_dir)],
    ):
        assert main(argv) == ExitCode.USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "[testbed].link_shaper" in err and '"kernel" needs root' in err, err
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


def test_a_shaper_that_is_neither_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(_manifest(tmp_path, "tc", rtt_ms=40.0))]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "[testbed].link_shaper" in err and "agent" in err and "kernel" in err, err


def test_kernel_shaping_with_nothing_to_shape_needs_no_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)  # would be refused if it were asked
    path = _manifest(tmp_path, "kernel", compute_slowdown=2.0)  # compute only, no link figure
    assert main(["check", str(path)]) == ExitCode.OK
