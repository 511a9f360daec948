"""Rounds recorded again after a resume are marked, and every reader keeps the later copy.

A SIGKILLed orchestrator leaves the checkpoint of its last evaluation, possibly with rounds (and
an evaluation) past it already recorded and the last line cut short. The records here are
written by the real writer and recorder, as the engine writes them: a first run up to round 23
whose newest checkpoint is round 10, then a resumed run from round 11 on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.records.reader import by_round, collect, last_rounds, load_run, read_jsonl
from orchestrator.records.writer import RunRecords
from orchestrator.training.devices import ForwardOut
from orchestrator.training.recorder import Recorder
from orchestrator.training.state import RunState
from orchestrator.ui.watch import snapshot_from_records

IDS = ("d0", "d1")
MANIFEST = parse_manifest(
    '[testbed]\nlisten = "127.0.0.1:0"\n[training]\nrounds = 40\n'
    + "".join(local_device_toml(i, f"tok-{i}") for i in IDS)
)


def _write(run: Path, rounds: range, evals: tuple[int, ...], resumed_from: int | None) -> None:
    records = RunRecords(run, manifest_to_toml(MANIFEST))
    recorder = Recorder(RunState(records, ""))
    if resumed_from is not None:  # as Engine._train does on a resume
        recorder.held = last_rounds(run)
        records.event("resumed", round=resumed_from, recorded_round=recorder.held["rounds"])
    fwd = {i: ForwardOut(np.zeros((4, 3)), np.zeros(4), 0.01, 0.02) for i in IDS}
    for r in rounds:
        loss = 1.0 / r + (0.5 if resumed_from is None else 0.0)  # tells the copies apart
        recorder.round(r, list(IDS), 0.05, fwd, {i: loss for i in IDS}, loss, 0.01, 0.01, {}, None)
        if r in evals:
            recorder.evaluation(r, IDS, [(loss, loss)] * len(IDS), None)
    records.close()


def test_repeats_after_a_resume_are_marked_and_the_later_copy_is_read(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run, range(1, 24), (10, 20), None)
    with open(run / "rounds.jsonl", "a", encoding="utf-8") as f:
        f.write('{"round":24,"round_ti')  # killed in the middle of round 24's line
    _write(run, range(11, 31), (20, 30), 10)

    # The torn line is gone, and said so; every line of every file parses.
    rows, dropped = read_jsonl(run / "rounds.jsonl")
    assert dropped == 0
    events, _ = read_jsonl(run / "events.jsonl")
    torn = [e for e in events if e["event"] == "torn_line"]
    assert [(e["file"], e["bytes"]) for e in torn] == [("rounds.jsonl", 21)]
    resumed = next(e for e in events if e["event"] == "resumed")
    assert (resumed["round"], resumed["recorded_round"]) == (10, 23)

    # Only the copies written again are marked: rounds 11-23 and the evaluation of round 20.
    assert [r["round"] for r in rows if r.get("repeat")] == list(range(11, 24))
    assert [r["round"] for r in rows if not r.get("repeat")] == list(range(1, 31))
    metrics, _ = read_jsonl(run / "metrics.jsonl")
    assert [(m["round"], m.get("repeat", False)) for m in metrics] == [
        (10, False), (20, False), (20, True), (30, False),
    ]  # fmt: skip

    # The report's reader keeps the later copy ...
    latest = by_round(rows)
    assert [r["round"] for r in latest] == list(range(1, 31))
    assert all(r["loss"] == 1.0 / r["round"] for r in latest if r["round"] > 10)
    stats = collect([load_run(run)])[0]
    assert [(e["round"], e["loss"]) for e in stats.evals] == [(10, 0.6), (20, 0.05), (30, 1 / 30)]
    # ... and so does the fold of `watch` and the live dashboard.
    snap = snapshot_from_records(run)
    assert [(p.round, p.loss) for p in snap.evals] == [(10, 0.6), (20, 0.05), (30, 1 / 30)]
    recent = [p.round for p in snap.recent_rounds]
    assert recent == list(range(1, 31))
    assert all(p.loss == 1.0 / p.round for p in snap.recent_rounds if p.round > 10)


def test_a_file_that_is_one_torn_line_is_emptied(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"round": 1', encoding="utf-8")
    (run / "devices.jsonl").write_text('{"t": 1.0}\n', encoding="utf-8")  # whole: kept
    records = RunRecords(run, "")
    records.close()
    assert (run / "metrics.jsonl").read_text(encoding="utf-8") == ""
    assert (run / "devices.jsonl").read_text(encoding="utf-8") == '{"t": 1.0}\n'
    lines = (run / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["file"] for x in lines] == ["metrics.jsonl"]
