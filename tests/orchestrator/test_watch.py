"""`watch`: the dashboard rebuilt from a run directory's records — against a real run of the round
engine, records cut short mid-line, records appended between refreshes, and records written by
the run's own producers (state, recorder, engine) for what a short run does not do by itself.

Every record a test reads was written by the real writer with the real producers' keys; the only
hand-made bytes are the damage that a reader must survive.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from rich.cells import cell_len
from rich.console import Console

from orchestrator.algorithms.lgi import LeaderTracker, lgi_diag
from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.errors import RunError
from orchestrator.fleet.admission import reported_facts
from orchestrator.names import Phase
from orchestrator.training.devices import ForwardOut
from orchestrator.training.recorder import Recorder
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
    the tests; returns its directory and the engine's own (live) final snapshot."""
    run_dir = tmp_path_factory.mktemp("watch") / "run"
    m = parse_manifest(RUN_MANIFEST)
    engine = Engine(m, run_dir, manifest_to_toml(m), run_id="w", in_process=True)
    status = asyncio.run(asyncio.wait_for(engine.run(), 120 * SCALE))
    assert status == "completed"
    return run_dir, engine.snapshot()


def _cut_final_event(run_dir: Path) -> bytes:
    """Take the run's final event off ``events.jsonl`` (as if the run were still going) and
    return that line, to be appended back later."""
    events = run_dir / "events.jsonl"
    data = events.read_bytes()
    cut = data.rstrip(b"\n").rfind(b"\n") + 1
    assert json.loads(data[cut:])["event"] == "run_completed"
    events.write_bytes(data[:cut])
    return data[cut:]


def test_snapshot_of_a_finished_run(finished: tuple[Path, RunSnapshot]) -> None:
    run_dir, live = finished
    snap = snapshot_from_records(run_dir)
    assert snap == live  # one fold: the live view is the records' view
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
    final = _cut_final_event(run_dir)  # as if the orchestrator were still running
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
    with open(run_dir / "events.jsonl", "ab") as f:
        f.write(final)
    last = watcher.snapshot()
    assert last.phase == "completed" and last.evals == finished[1].evals


def _engine(tmp_path: Path) -> Engine:
    """An engine that is never run: its state, recorder and telemetry write the records."""
    text = RUN_MANIFEST.replace('"a"', '"x"').replace('"b"', '"y"')
    text += '\n[[devices]]\nid = "z"\ntoken = "tok-z"\n'
    m = parse_manifest(text)
    return Engine(m, tmp_path / "hand", manifest_to_toml(m), run_id="h")


def test_damaged_line_is_skipped_and_reported(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    with open(engine.records.dir / "events.jsonl", "a") as f:
        f.write('{"t": 1.0, "event": \x00garbage\n')
    engine.state.event("joined", "x", {"peer": "p"})
    snap = snapshot_from_records(engine.records.dir)
    assert "1 damaged record line(s) skipped" in snap.message
    assert snap.events[-1].event == "joined"


def _forward(batch: int, compute_s: float, wait_s: float) -> ForwardOut:
    labels = np.zeros(batch, np.int64)
    return ForwardOut(np.zeros((batch, 4), np.float32), labels, compute_s, wait_s)


def _same_but_the_clock(live: RunSnapshot, watched: RunSnapshot) -> None:
    # Mid-run each reader has its own clock (monotonic since start / wall time since the
    # manifest was written): the time fields differ, nothing else may.
    clock = {"elapsed_s": 0.0, "eta_s": None}
    assert dataclasses.replace(live, **clock) == dataclasses.replace(watched, **clock)


def test_statuses_phase_and_gapsl_view_from_the_producers_records(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    st, run_dir = engine.state, engine.records.dir
    st.event("listening", None, {"url": "ws://127.0.0.1:40404"})
    facts = reported_facts({"hostname": "pi-x", "platform": "Linux aarch64", "cpu_count": 4})
    st.event("joined", "x", {"peer": "p", **facts})
    st.event("joined", "y", {"peer": "p"})
    st.event("refused", "intruder", {"code": 1008, "reason": "bad token", "peer": "p"})
    ready = {"load_s": 0.3, "restored_round": None, **reported_facts({"torch_device": "cpu"})}
    st.event("ready", "x", {"shard_size": 600, **ready})
    snap = snapshot_from_records(run_dir)
    assert snap.phase == "waiting" and snap.listen == "127.0.0.1:40404"
    assert {d.id: d.status for d in snap.devices} == {"x": "joined", "y": "joined", "z": "waiting"}
    assert snap.missing == ("z",)
    x = snap.devices[0]
    assert (x.shard_size, x.hostname, x.platform, x.cpu_count) == (600, "pi-x", "Linux aarch64", 4)
    assert snap.devices[2].launch == "remote"
    assert "fleet 2/3" in _text(snap)

    st.event("ready", "y", {"shard_size": 500, **ready})
    st.event("joined", "z", {"peer": "p"})
    st.event("ready", "z", {"shard_size": 400, **ready})
    st.phase = Phase.TRAINING
    rec = Recorder(st)
    rec.round_started(1, {"z": 16})
    assert {d.id: d.status for d in engine.snapshot().devices}["z"] == "computing"
    rec.round(1, ["z"], 0.2, {"z": _forward(16, 0.032, 0.05)}, {"z": 1.5}, 2.0, 0.01, 0.02,
              {}, None)  # fmt: skip
    ids = ["x", "y", "z"]
    tracker = LeaderTracker()
    for r, grads in ((2, [[1.0, 0.0], [-1.0, 0.5], [1.0, 0.1]]), (3, [[0, 1.0], [1, 0], [0, 1]])):
        rec.round_started(r, {i: 16 for i in ids})
        diag = lgi_diag(tracker(torch.tensor(grads), [16, 16, 16]), 0.4)
        fwd = {i: _forward(16, 0.032, 0.05) for i in ids}
        rec.round(r, ids, 0.3, fwd, dict.fromkeys(ids, 1.5), 1.8, 0.01, 0.02, diag, None)
    st.event("lost", "y", {"code": 1006})
    st.event("rejoined", "y", {"peer": "p"})
    st.event("lost", "x", {"code": 1006})
    st.event("agent_exited", "x", {"code": 1})
    z = engine.sessions["z"]
    z.stats = {"cpu_percent": 55.0, "mem_percent": 40.0, "temp_c": None}
    z.ws = SimpleNamespace(latency=0.0125)  # the keepalive's ping round trip
    engine._telemetry(z)
    snap = snapshot_from_records(run_dir)
    _same_but_the_clock(engine.snapshot(), snap)
    assert snap.phase == "training" and snap.round == 3 and snap.rounds == 20
    assert {d.id: d.status for d in snap.devices} == {"x": "lost", "y": "joined", "z": "computing"}
    z_view = snap.devices[2]
    assert (z_view.rounds_done, z_view.batch_size, z_view.last_loss) == (3, 16, 1.5)
    assert (z_view.cpu_percent, z_view.rtt_ms, z_view.shard_size) == (55.0, 12.5, 400)
    assert z_view.compute_ms_per_sample == pytest.approx(2.0) and z_view.temp_c is None
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    g = snap.gapsl
    assert g is not None and g.device_ids == ("x", "y", "z")
    assert list(g.leaders) == rounds[-1]["leaders"] and g.leaders != rounds[1]["leaders"]
    assert [list(row) for row in g.cosine] == rounds[-1]["cos"]
    assert (g.align_after, g.churn) == (0.4, rounds[-1]["churn"]) and g.churn is not None
    assert g.churn > 0  # the leader set changed between rounds 2 and 3
    assert "GAPSL cosine" in _text(snap) and "churn" in _text(snap)
    assert snap.eta_s is not None and snap.eta_s > 0

    st.finish("failed", "boom", 5.0)
    snap = snapshot_from_records(run_dir)
    assert (snap.phase, snap.message, snap.eta_s, snap.elapsed_s) == ("failed", "boom", None, 5.0)
    assert snap == engine.snapshot()


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

    engine = _engine(tmp_path)
    engine.state.finish("interrupted", "interrupted by signal", 1.0)
    engine.records.close()
    args = _args(str(engine.records.dir))
    assert args.func(args) == 130


def test_live_watch_stops_after_drawing_the_final_frame(
    finished: tuple[Path, RunSnapshot], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    final = _cut_final_event(run_dir)
    watcher = RunWatcher(run_dir)
    frames: list[str] = []
    fold = watcher.snapshot

    def snapshot() -> RunSnapshot:
        snap = fold()
        frames.append(snap.phase)
        if len(frames) == 2:  # the run ends while the dashboard is up
            with open(run_dir / "events.jsonl", "ab") as f:
                f.write(final)
        return snap

    watcher.snapshot = snapshot  # type: ignore[method-assign]
    out = io.StringIO()
    console = Console(file=out, width=100, height=30, force_terminal=True, color_system=None)
    status = asyncio.run(asyncio.wait_for(watch_live(watcher, console, 50.0), 10 * SCALE))
    assert status == "completed"
    assert frames[:2] == ["training", "training"] and frames[-2:] == ["completed", "completed"]
    assert "COMPLETED" in out.getvalue()
