"""Tests of the run-directory reader and ``gapsl-orchestrator report`` on real run directories.

Two short runs (two local agents on the bundled digits, different seeds) are made once for the
module by the real engine; every test reads them, and copies them where it damages one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path

import pytest

from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.errors import RunError
from orchestrator.records.reader import load_run, read_jsonl
from orchestrator.ui.report import add_parser, build_report, run_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("accuracy_vs_round.png", "accuracy_vs_time.png", "round_time.png", "device_accuracy.png")
SEEDS = (0, 1)

MANIFEST = """
[testbed]
name = "report-test"
listen = "127.0.0.1:0"
join_timeout_s = 120.0

[training]
rounds = 20
eval_every = 5
seed = {seed}

[data]
partition = "dirichlet"
alpha = 0.5
test_limit = 300

[server]
device = "cpu"

[[devices]]
id = "edge-a"
token = "token-a"
launch = "local"
device = "cpu"

[[devices]]
id = "edge-b"
token = "token-b"
launch = "local"
device = "cpu"
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    dirs = [root / f"digits-psl-s{seed}" for seed in SEEDS]
    manifests = [parse_manifest(MANIFEST.format(seed=seed)) for seed in SEEDS]

    async def both() -> list[str]:
        # Side by side: most of a short run is the agents starting up, which overlaps well.
        engines = [
            Engine(m, d, manifest_to_toml(m), run_id=f"report{i}")
            for i, (m, d) in enumerate(zip(manifests, dirs))
        ]
        return list(await asyncio.gather(*(e.run() for e in engines)))

    statuses = asyncio.run(both())
    assert statuses == ["completed", "completed"], [(d / "summary.json").read_text() for d in dirs]
    return dirs


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("agents", "report"))
    return copy


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, as lists of cells."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:  # past the header and its rule
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_load_run_reads_every_record(runs: list[Path]) -> None:
    run = load_run(runs[0])
    assert run.status == "completed"
    assert run.manifest is not None and run.manifest.training.seed == SEEDS[0]
    assert run.manifest_text.startswith("#")
    assert [m["round"] for m in run.metrics] == [5, 10, 15, 20]
    assert [r["round"] for r in run.rounds] == list(range(1, 21))
    assert {e["event"] for e in run.events} >= {"joined", "ready"}
    assert run.devices and not run.dropped
    assert run.setting("data.alpha") == 0.5


def test_report_on_two_runs(runs: list[Path], tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "report"
    written = build_report(runs, out)
    assert sorted(p.name for p in written) == sorted([*PLOTS, "summary.md"])
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
    # No run here records a cosine matrix: no heat map.
    assert not (out / "cosine_heatmap.png").exists()

    md = (out / "summary.md").read_text(encoding="utf-8")
    rows = _table_rows(md, "## Runs")
    assert [r[0] for r in rows] == [d.name for d in runs]
    for row, run in zip(rows, runs):
        summary = json.loads((run / "summary.json").read_text())
        assert row[1:8] == ["psl", "digits", "dirichlet α=0.5", str(summary["seed"]), "2"] + [
            "completed",
            "20",
        ]
        finals = [summary[f"final_acc_{k}"] for k in ("mean", "min", "max")]
        assert row[8:11] == [f"{100 * v:.1f}" for v in finals]
    for name in PLOTS:
        assert f"]({name})" in md
    # Same configuration, two seeds: the grouped table holds one row of mean ± std.
    grouped = _table_rows(md, "## Across seeds")
    assert len(grouped) == 1 and grouped[0][4] == "2" and "±" in grouped[0][6]


def test_cosine_heatmap_drawn_when_recorded(runs: list[Path], tmp_path: Path) -> None:
    run = _copy(runs[0], tmp_path)
    rounds = run / "rounds.jsonl"
    records = [json.loads(line) for line in rounds.read_text().splitlines()]
    for rec in records:
        rec["cos"] = [[1.0, 0.25], [0.25, 1.0]] if rec["round"] % 4 == 0 else None
    rounds.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    written = build_report([run], tmp_path / "out")
    heatmap = tmp_path / "out" / "cosine_heatmap.png"
    assert heatmap in written and heatmap.read_bytes()[:8] == PNG_SIGNATURE


def test_truncated_last_line_is_tolerated(runs: list[Path], tmp_path: Path) -> None:
    run = _copy(runs[1], tmp_path)
    for name in ("metrics", "rounds", "events"):
        with open(run / f"{name}.jsonl", "a", encoding="utf-8") as f:
            f.write('{"round": 21, "time_s": 3')  # a kill in the middle of a write
    (run / "summary.json").unlink()  # ... before the summary was written
    loaded = load_run(run)
    assert loaded.dropped == {"metrics": 1, "rounds": 1, "events": 1}
    assert loaded.status == "incomplete" and len(loaded.metrics) == 4
    build_report([run], tmp_path / "out")
    md = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8")
    row = _table_rows(md, "## Runs")[0]
    assert row[6] == "incomplete" and row[7] == "20"
    last = json.loads((runs[1] / "metrics.jsonl").read_text().splitlines()[-1])
    assert row[8] == f"{100 * last['acc_mean']:.1f}"
    assert "truncated last line of metrics.jsonl" in md


def test_damage_before_the_last_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": \n{"round": 3}\n')
    with pytest.raises(RunError, match=r"metrics.jsonl:2"):
        read_jsonl(path)


def test_not_a_run_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RunError, match="not a run directory"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "out")


def test_without_matplotlib_only_the_summary(
    runs: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    written = build_report(runs, tmp_path / "out")
    assert [p.name for p in written] == ["summary.md"]
    md = written[0].read_text(encoding="utf-8")
    assert "gapsl-testbed[report]" in md and ".png" not in md
    assert "gapsl-testbed[report]" in capsys.readouterr().err


def test_cli_run_report(runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser(prog="gapsl-orchestrator")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli"
    args = parser.parse_args(["report", *map(str, runs), "--out", str(out)])
    assert args.func is run_report
    assert run_report(args) == 0
    assert (out / "summary.md").is_file() and (out / "accuracy_vs_round.png").is_file()
    # One run and no --out: the report goes inside the run directory.
    single = _copy(runs[0], tmp_path)
    assert run_report(parser.parse_args(["report", str(single)])) == 0
    assert (single / "report" / "summary.md").is_file()
    # Several runs and no --out: ./report-<time>.
    monkeypatch.chdir(tmp_path)
    assert run_report(parser.parse_args(["report", *map(str, runs)])) == 0
    assert len(list(tmp_path.glob("report-*/summary.md"))) == 1
