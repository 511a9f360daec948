"""`watch`: the dashboard rebuilt from a run directory's records — against a real local-fleet run,
records cut short mid-line, records appended between refreshes, and hand-written event logs."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console

from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.errors import RunError
from orchestrator.ui.render import render
from orchestrator.ui.snapshot import RunSnapshot
from orchestrator.ui.watch import RunWatcher, add_parser, snapshot_from_records, watch_live

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))

RUN_MANIFEST = """
[testbed]
name = "watched"
listen = "127.0.0.1:0"
join_timeout_s = 120.0

[training]
dataset = "digits"
rounds = 20
eval_every = 5
seed = 3

[data]
partition = "iid"
test_limit = 200

[[devices]]
id = "a"
token = "tok-a"
launch = "local"
device = "cpu"

[[devices]]
id = "b"
token = "tok-b"
launch = "local"
device = "cpu"
"""


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunSnapshot]:
    """One real run of the round engine with its devices in this process (the reference engine,
    so the records are written exactly as in a fleet run, minus the agents' start-up), shared by
    the tests; returns its directory and the engine's own final snapshot."""
    from orchestrator.engine import Engine

    run_dir = tmp_path_factory.mktemp("watch") / "run"
    m = parse_manifest(RUN_MANIFEST)
    engine = Engine(m, run_dir, manifest_to_toml(m), run_id="w", in_process=True)
    status = asyncio.run(asyncio.wait_for(engine.run(), 120 * SCALE))
    assert status == "completed"
    return run_dir, engine.state.snapshot()


def test_snapshot_of_a_finished_run(finished: tuple[Path, RunSnapshot]) -> None:
    run_dir, live = finished
    snap = snapshot_from_records(run_dir)
    assert [d.id for d in snap.devices] == ["a", "b"]
    assert all(d.status == "done" for d in snap.devices)
    assert (snap.phase, snap.round, snap.rounds) == ("completed", 20, 20)
    assert (snap.name, snap.algorithm, snap.dataset, snap.partition) == (
        "watched",
        "psl",
        "digits",
        "iid",
    )
    metrics = _jsonl(run_dir / "metrics.jsonl")
    assert [e.round for e in snap.evals] == [r["round"] for r in metrics] == [5, 10, 15, 20]
    for point, rec in zip(snap.evals, metrics):
        assert (point.acc_mean, point.acc_min, point.acc_max, point.loss) == (
            rec["acc_mean"],
            rec["acc_min"],
            rec["acc_max"],
            rec["loss"],
        )
    assert snap.evals == live.evals
    assert {d.id: d.accuracy for d in snap.devices} == metrics[-1]["acc"]
    assert {d.id: d.accuracy for d in snap.devices} == {d.id: d.accuracy for d in live.devices}
    assert [r.round for r in snap.recent_rounds] == list(range(1, 21))
    for d in snap.devices:
        assert (d.rounds_done, d.batch_size, d.launch, d.torch_device) == (20, 32, "local", "cpu")
        assert d.compute_ms_per_sample is not None
    assert snap.events[-1].event == "run_completed"
    assert snap.eta_s == 0.0 and snap.elapsed_s > 0
    assert snap.gapsl is None  # PSL has no leader set to show


def test_render_of_the_records_fits_80x24(finished: tuple[Path, RunSnapshot]) -> None:
    snap = snapshot_from_records(finished[0])
    out = io.StringIO()
    console = Console(width=80, height=24, file=out, color_system=None, force_terminal=False)
    console.print(render(snap, 80, 24))
    lines = out.getvalue().rstrip("\n").split("\n")
    assert len(lines) <= 23
    assert max(cell_len(line) for line in lines) <= 80
    text = out.getvalue()
    assert "COMPLETED" in text and "round 20/20" in text and "fleet 2/2" in text


def test_truncated_last_line_then_appended_rest(
    finished: tuple[Path, RunSnapshot], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    summary = (run_dir / "summary.json").read_text()
    (run_dir / "summary.json").unlink()  # as if the orchestrator were still running
    metrics = run_dir / "metrics.jsonl"
    data = metrics.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1 + 40  # 40 bytes into the last line
    metrics.write_bytes(data[:cut])

    snap = snapshot_from_records(run_dir)
    assert [e.round for e in snap.evals] == [5, 10, 15]
    assert snap.phase == "training" and snap.message == ""

    watcher = RunWatcher(run_dir)
    assert [e.round for e in watcher.snapshot().evals] == [5, 10, 15]
    read = watcher.bytes_read
    watcher.snapshot()
    assert watcher.bytes_read == read  # unchanged files are not read again
    with open(metrics, "ab") as f:
        f.write(data[cut:])
    again = watcher.snapshot()
    assert [e.round for e in again.evals] == [5, 10, 15, 20]
    # Only the appended bytes and the cut line's first part (kept back until whole) are read.
    assert watcher.bytes_read == read + len(data) - cut + 40
    (run_dir / "summary.json").write_text(summary)
    final = watcher.snapshot()
    assert final.phase == "completed" and final.evals == finished[1].evals


def test_damaged_line_is_skipped_and_reported(tmp_path: Path) -> None:
    run_dir = _hand_written_run(tmp_path)
    with open(run_dir / "events.jsonl", "a") as f:
        f.write('{"t": 1.0, "event": \x00garbage\n{"t": 2.0, "event": "joined", "device": "x"}\n')
    snap = snapshot_from_records(run_dir)
    assert "1 damaged record line(s) skipped" in snap.message
    assert snap.events[-1].event == "joined"


def _hand_written_run(tmp_path: Path) -> Path:
    text = RUN_MANIFEST.replace('"a"', '"x"').replace('"b"', '"y"')
    text += '\n[[devices]]\nid = "z"\ntoken = "tok-z"\n'
    m = parse_manifest(text)
    run_dir = tmp_path / "hand"
    run_dir.mkdir()
    (run_dir / "manifest.toml").write_text(manifest_to_toml(m))
    return run_dir


def _append(path: Path, *records: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_statuses_phase_and_gapsl_view_from_hand_written_records(tmp_path: Path) -> None:
    run_dir = _hand_written_run(tmp_path)
    events = run_dir / "events.jsonl"
    _append(
        events,
        {"t": 0.5, "event": "listening", "url": "ws://127.0.0.1:40404"},
        {"t": 1.0, "event": "joined", "device": "x", "peer": "p", "hostname": "pi-x"},
        {"t": 1.1, "event": "joined", "device": "y", "peer": "p"},
        {"t": 1.2, "event": "refused", "device": "intruder", "code": 1008, "reason": "bad"},
        {"t": 2.0, "event": "ready", "device": "x", "shard_size": 600, "load_s": 0.3},
    )
    snap = snapshot_from_records(run_dir)
    assert snap.phase == "waiting" and snap.listen == "127.0.0.1:40404"
    assert {d.id: d.status for d in snap.devices} == {"x": "joined", "y": "joined", "z": "waiting"}
    assert snap.missing == ("z",)
    assert snap.devices[0].shard_size == 600 and snap.devices[0].hostname == "pi-x"
    assert snap.devices[2].launch == "remote"
    assert "fleet 2/3" in _text(snap)

    _append(
        events,
        {"t": 3.0, "event": "lost", "device": "y", "code": 1006},
        {"t": 3.2, "event": "rejoined", "device": "y", "peer": "p"},
        {"t": 3.4, "event": "lost", "device": "x", "code": 1006},
        {"t": 3.5, "event": "agent_exited", "device": "x", "code": 1},
    )
    cos = [[1.0, 0.2, -0.1], [0.2, 1.0, 0.05], [-0.1, 0.05, 1.0]]
    dev = {"batch": 16, "compute_s": 0.032, "uplink_s": 0.01, "wait_s": 0.05, "loss": 1.5}
    _append(
        run_dir / "rounds.jsonl",
        {"round": 1, "round_time_s": 0.2, "loss": 2.0, "devices": {"z": dev}},
        {"round": 2, "round_time_s": 0.3, "loss": None, "leaders": ["x", "z"], "cos": cos,
         "align_before": 0.1, "align_after": 0.4, "devices": {"z": dev}},
    )  # fmt: skip
    _append(
        run_dir / "devices.jsonl",
        {"t": 4.0, "device": "z", "cpu_percent": 55.0, "rtt_ms": 12.5, "temp_c": None},
    )
    snap = snapshot_from_records(run_dir)
    assert snap.phase == "training" and snap.round == 2 and snap.rounds == 20
    assert {d.id: d.status for d in snap.devices} == {"x": "lost", "y": "joined", "z": "joined"}
    z = snap.devices[2]
    assert (z.rounds_done, z.batch_size, z.last_loss, z.cpu_percent, z.rtt_ms) == (
        2,
        16,
        1.5,
        55.0,
        12.5,
    )
    assert z.compute_ms_per_sample == pytest.approx(2.0) and z.temp_c is None
    assert snap.gapsl is not None
    assert snap.gapsl.device_ids == ("x", "y", "z") and snap.gapsl.leaders == ("x", "z")
    assert snap.gapsl.cosine[0][2] == -0.1 and snap.gapsl.align_after == 0.4
    assert "GAPSL cosine" in _text(snap)
    assert snap.eta_s is not None and snap.eta_s > 0

    (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": "boom"}))
    snap = snapshot_from_records(run_dir)
    assert (snap.phase, snap.message, snap.eta_s) == ("failed", "boom", None)


def _text(snap: RunSnapshot) -> str:
    out = io.StringIO()
    Console(width=120, file=out, color_system=None).print(render(snap, 120, 40))
    return out.getvalue()


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no manifest.toml"):
        snapshot_from_records(tmp_path)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["watch", *argv])


def test_once_prints_one_plain_frame(
    finished: tuple[Path, RunSnapshot], capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(str(finished[0]), "--once", "--width", "80", "--height", "24")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "round 20/20" in out and "\x1b" not in out
    assert len(out.rstrip("\n").split("\n")) <= 23


def test_headless_watch_prints_lines_and_exits_with_the_run_status(
    finished: tuple[Path, RunSnapshot], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args(str(finished[0]))
    assert args.func(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("event=preparing")
    assert sum(line.startswith("eval round=") for line in out) == 4
    assert out[-1].startswith("event=run_completed")

    run_dir = _hand_written_run(tmp_path)
    (run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    args = _args(str(run_dir))
    assert args.func(args) == 130


def test_live_watch_stops_after_drawing_the_final_frame(
    finished: tuple[Path, RunSnapshot], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    summary = run_dir / "summary.json"
    text = summary.read_text()
    summary.unlink()
    watcher = RunWatcher(run_dir)
    frames: list[str] = []
    fold = watcher.snapshot

    def snapshot() -> RunSnapshot:
        snap = fold()
        frames.append(snap.phase)
        if len(frames) == 2:  # the run ends while the dashboard is up
            summary.write_text(text)
        return snap

    watcher.snapshot = snapshot  # type: ignore[method-assign]
    out = io.StringIO()
    console = Console(file=out, width=100, height=30, force_terminal=True, color_system=None)
    status = asyncio.run(asyncio.wait_for(watch_live(watcher, console, 50.0), 10 * SCALE))
    assert status == "completed"
    assert frames[:2] == ["training", "training"] and frames[-2:] == ["completed", "completed"]
    assert "COMPLETED" in out.getvalue()
