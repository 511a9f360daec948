"""The dashboard over a whole run: a bounded event log that leaves the trends their rows, the
evaluations in it, routine lines folded, figures rounded for people, the join countdown and a
compact host column."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from orchestrator.config.manifest import local_device_toml, parse_manifest
from orchestrator.records.writer import RunRecords
from orchestrator.ui.fold import RunFold
from orchestrator.ui.log_lines import describe
from orchestrator.ui.render import _host
from orchestrator.ui.snapshot import DeviceView, EvalPoint, EventLine, RunSnapshot
from tests.orchestrator.test_dashboard import _print, _snapshot


def trend_rows(screen: str) -> int:
    """How many chart rows the trends panel shows (lines between its borders)."""
    lines = screen.splitlines()
    top = next(i for i, line in enumerate(lines) if "─ trends " in line)
    bottom = next(i for i in range(top + 1, len(lines)) if lines[i].lstrip().startswith("╰"))
    return bottom - top - 1


def _long_run(rounds: int) -> RunSnapshot:
    snap = _snapshot()
    events = tuple(
        EventLine(float(t), "straggler", "local-03", f"round {t}, deadline 2.6 s")
        for t in range(50)
    )
    evals = tuple(EvalPoint(r, float(r), 0.9, 0.88, 0.92, 0.3) for r in range(10, rounds + 1, 10))
    return dataclasses.replace(snap, events=events, evals=evals, round=rounds, rounds=rounds)


def test_a_long_runs_log_leaves_the_trends_their_rows() -> None:
    for width, height in [(80, 24), (120, 40), (160, 48)]:
        short = trend_rows(_print(_snapshot(), width, height))
        long = trend_rows(_print(_long_run(150), width, height))
        assert long >= 3 and long == short, (width, height)
    text = _print(_long_run(150), 80, 24)
    assert "eval" in text and "round 150 acc 90.0 % (min 88.0)" in text


def test_evaluations_join_the_log_in_time_order() -> None:
    text = _print(_snapshot(), 160, 48)
    log = text[text.index("─ events ") :]
    assert "round 35 acc 85.3 % (min 72.0)" in log
    times = [float(t) for t in re.findall(r"│\s+([\d.]+)s ", log)]
    assert times == sorted(times) and len(times) > 8


def test_fields_read_for_people() -> None:
    text = describe(
        {"uplink_mbps": 5936.7528, "rtt_ms": 0.9398, "restored_round": None, "load_s": 6.608,
         "memory_bytes": 25276059648, "round": 4, "wall_s": 124.4}
    )  # fmt: skip
    assert text == "uplink 5.9 Gbit/s, rtt 0.94 ms, load 6.6 s, memory 24 GiB, round 4, wall 2m04s"


def _fold(tmp_path: Path, ids: tuple[str, ...] = ("d",)) -> tuple[RunRecords, RunFold]:
    """A fold subscribed to the real records writer, as the engine's is."""
    devices = "".join(local_device_toml(i, f"tok-{i}") for i in ids)
    m = parse_manifest('[testbed]\nlisten = "127.0.0.1:0"\n' + devices)
    records = RunRecords(tmp_path / "run", "")
    fold = RunFold(m)
    records.subscribe(fold.add)
    return records, fold


def test_routine_lines_fold_into_one(tmp_path: Path) -> None:
    records, fold = _fold(tmp_path)
    headless: list[str] = []
    fold.on_line = headless.append
    records.event("joined", "d", hostname="pi", restored_round=None)
    for r in (10, 20, 30):
        records.event("checkpoint", None, round=r)
    records.event("lost", "d")
    records.event("checkpoint", None, round=40)
    records.close()
    log = [(e.event, e.text) for e in fold.snapshot(1.0).events]
    assert log == [
        ("joined", "hostname pi"),
        ("checkpoint", "round 30 (3×)"),
        ("lost", ""),
        ("checkpoint", "round 40"),
    ]
    # The headless lines keep every event, in the records' key=value, for grep.
    assert headless[0].startswith("event=joined device=d t=")
    assert headless[0].endswith(' text="hostname=pi"')
    assert sum(line.startswith("event=checkpoint") for line in headless) == 4


def test_a_device_computes_from_its_work_request_to_the_round_after(tmp_path: Path) -> None:
    records, fold = _fold(tmp_path, ("d", "e"))

    def statuses() -> list[str]:
        return [d.status for d in fold.snapshot(0.0).devices]

    for d in ("d", "e"):
        records.event("ready", d, shard_size=10)
    assert statuses() == ["joined", "joined"]
    records.event("round_started", None, round=1, asked="d,e")
    assert statuses() == ["computing", "computing"]
    records.event("round_started", None, round=2, asked="e")  # d sits this round out
    assert statuses() == ["joined", "computing"]
    records.close()


def test_waiting_counts_down_the_join_timeout(tmp_path: Path) -> None:
    records, fold = _fold(tmp_path)
    records.event("joining", None, timeout_s=120.0)
    records.close()
    snap = fold.snapshot(0.0)
    assert snap.join_deadline_s is not None
    later = dataclasses.replace(snap, elapsed_s=snap.join_deadline_s - 75.0)
    assert "1m15s left of the join timeout" in _print(later, 80, 24)


def test_the_host_column_is_compact() -> None:
    d = DeviceView("pi", "joined", "remote", "a-very-long-lab-hostname-01.example.org",
                   "Linux aarch64", "cuda", 4, 3.7)  # fmt: skip
    # The name keeps 12 characters; the machine gives way first, the accelerator and size stay.
    assert _host(d) == "a-very-long-… cuda 4c/4G"
    assert _host(dataclasses.replace(d, hostname="pi-01")) == "pi-01 aarch64 cuda 4c/4G"
    text = _print(_snapshot(), 160, 48)
    header = next(line for line in text.splitlines() if " host " in line)
    assert header.index("cpu%") - header.index("host") <= 24 + 3
