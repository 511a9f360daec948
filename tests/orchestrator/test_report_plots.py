"""The report's figures, read as matplotlib objects (not pixels): legends name algorithm and seed,
round time is in ms on readable ticks with nothing cut off, accuracy bars start at 0."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from orchestrator.records.reader import RunStats, collect, load_run
from orchestrator.ui.plots import PLOTS, legend_names
from tests.orchestrator.test_report import runs  # noqa: F401 (the module's two real runs)

DRAW = {file: draw for file, _title, draw in PLOTS}


@pytest.fixture(scope="module")
def stats(runs: list[Path]) -> list[RunStats]:  # noqa: F811
    return collect([load_run(p) for p in runs])


def _inside_figure(fig: Any, artists: list[Any]) -> None:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for a in artists:
        if not a.get_visible() or (hasattr(a, "get_text") and not a.get_text()):
            continue
        ext = a.get_window_extent(renderer)
        assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, (a, ext, box)
        assert box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1, (a, ext, box)


def test_legends_say_algorithm_and_seed(stats: list[RunStats]) -> None:
    assert legend_names(stats) == ["psl, seed 0", "psl, seed 1"]
    for file in ("accuracy_vs_round.png", "accuracy_vs_time.png", "device_accuracy.png"):
        (ax, *_) = DRAW[file](stats).axes
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts == ["psl, seed 0", "psl, seed 1"], file
    (ax,) = DRAW["round_time.png"](stats).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["psl, seed 0", "psl, seed 1"]
    assert not any("digits-psl-s" in t.get_text() for t in ax.get_xticklabels())


def test_twins_in_algorithm_and_seed_are_told_apart(stats: list[RunStats]) -> None:
    a = dataclasses.replace(stats[0], config={**stats[0].config, "data.alpha": 0.1})
    b = dataclasses.replace(stats[0], config={**stats[0].config, "data.alpha": 0.5})
    assert legend_names([a, b, stats[1]]) == [
        "psl, seed 0, alpha=0.1",
        "psl, seed 0, alpha=0.5",
        "psl, seed 1",
    ]
    same = legend_names([stats[0], stats[0]])
    assert same[0].startswith("psl, seed 0 (") and same[0].endswith("digits-psl-s0)")


def test_round_time_is_in_ms_on_readable_ticks_and_nothing_is_cut_off(
    stats: list[RunStats],
) -> None:
    fig = DRAW["round_time.png"](stats)
    (ax,) = fig.axes
    assert "ms" in ax.get_ylabel()
    tops: dict[int, float] = {}
    for p in ax.patches:
        x = round(p.get_x() + p.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), p.get_y() + p.get_height())
    for x, s in enumerate(stats):  # the stack is the breakdown, in ms
        assert tops[x] == pytest.approx(1000 * sum(s.breakdown.values()))
    measured = [1000 * s.mean_round_s for s in stats if s.mean_round_s is not None]
    bottom, top = ax.get_ylim()
    assert bottom == 0 and top > max([*tops.values(), *measured])
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert 3 <= len(labels) <= 8, labels
    assert all("e" not in t.lower() for t in labels), labels  # no scientific notation
    assert ax.yaxis.get_offset_text().get_text() == ""  # no "+1e3" offset to add in one's head
    legend = ax.get_legend()
    _inside_figure(fig, [legend, ax.yaxis.label, ax.title, *ax.get_xticklabels()])


def test_device_accuracy_bars_start_at_zero(stats: list[RunStats]) -> None:
    (ax,) = DRAW["device_accuracy.png"](stats).axes
    assert ax.get_ylim() == (0, 100)
    assert all(p.get_y() == 0 for p in ax.patches)
