"""``run --resume RUN_DIR`` refuses what it cannot continue, with a reason, and reads the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config.manifest import load_manifest, manifest_to_toml, parse_manifest
from orchestrator.errors import GapslError
from orchestrator.records import checkpoint
from orchestrator.records.resume import prepare_resume

MANIFEST = """
[training]
rounds = 20
[[devices]]
id = "a"
token = "ta"
[[devices]]
id = "b"
token = "tb"
"""


def _run_dir(tmp_path: Path, summary: dict | None, ckpt_round: int | None, ids=("a", "b")) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.toml").write_text(manifest_to_toml(parse_manifest(MANIFEST)))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if ckpt_round is not None:
        state = {"round": ckpt_round, "run_id": "from-ckpt", "clients": {i: {} for i in ids}}
        checkpoint.save(run, state)
    (run / "events.jsonl").write_text('{"t":1.5,"event":"joined"}\n{"t":42.25,"event":"lost"}\n')
    return run


def test_a_completed_run_is_not_resumed(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, {"status": "completed", "run_id": "x", "wall_s": 3.0}, 10)
    with pytest.raises(GapslError, match="nothing to resume"):
        prepare_resume(run)
    assert main(["run", "--resume", str(run), "--no-dashboard"]) == 1


def test_a_folder_that_is_no_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GapslError, match="not a run directory"):
        prepare_resume(tmp_path)


def test_nothing_names_the_run(tmp_path: Path) -> None:
    with pytest.raises(GapslError, match="start the run again"):
        prepare_resume(_run_dir(tmp_path, None, None))


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    r = prepare_resume(_run_dir(tmp_path, None, 10))
    assert r.run_id == "from-ckpt" and r.checkpoint is not None and r.checkpoint["round"] == 10
    assert r.wall_s == 42.25  # the last event: the run's clock carries on from there


def test_an_interrupted_run_keeps_its_id_and_clock(tmp_path: Path) -> None:
    summary = {"status": "interrupted", "run_id": "abc", "wall_s": 7.5}
    r = prepare_resume(_run_dir(tmp_path, summary, 10))
    assert (r.run_id, r.wall_s) == ("abc", 7.5)


def test_changed_devices_and_a_finished_checkpoint_are_refused(tmp_path: Path) -> None:
    summary = {"status": "interrupted", "run_id": "abc", "wall_s": 7.5}
    with pytest.raises(GapslError, match="no partition of b"):
        prepare_resume(_run_dir(tmp_path, summary, 10, ids=("a",)))
    run = tmp_path / "run"
    checkpoint.save(run, {"round": 20, "run_id": "abc", "clients": {"a": {}, "b": {}}})
    with pytest.raises(GapslError, match="training.rounds"):
        prepare_resume(run)
    assert prepare_resume(run, ["training.rounds=30"]).manifest.training.rounds == 30


def test_tokens_are_read_again_from_the_manifest_they_came_from(tmp_path: Path) -> None:
    source = tmp_path / "lab.toml"
    source.write_text(MANIFEST)
    stored = manifest_to_toml(load_manifest(source), redact_tokens=True)
    assert '"ta"' not in stored and '"tb"' not in stored
    summary = {"status": "interrupted", "run_id": "abc", "wall_s": 7.5}
    run = _run_dir(tmp_path, summary, 10)
    (run / "manifest.toml").write_text(stored)
    m = prepare_resume(run).manifest
    assert [d.token for d in m.devices] == ["ta", "tb"] and m.tokens_from == str(source)
    # A token given again on the command line wins; without the source, every one must be.
    source.unlink()
    with pytest.raises(GapslError, match=r"--set devices\.a\.token"):
        prepare_resume(run)
    given = ["devices.a.token=ta2", "devices.b.token=tb2"]
    assert [d.token for d in prepare_resume(run, given).manifest.devices] == ["ta2", "tb2"]
