"""bench.round and bench.scale run end to end in their --quick configuration.

Each starts real processes (agents, an orchestrator) on loopback and ends with its JSON summary.
The figures depend on the machine and its load, so the headline keys are only checked to be
positive numbers: no thresholds.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import pytest

from bench import round as round_bench
from bench import scale


def _quick_summary(main: Callable[[list[str]], int], out: pytest.CaptureFixture[str]) -> Any:
    assert main(["--quick"]) == 0
    lines = out.readouterr().out.strip().splitlines()
    assert len(lines) > 1  # a human-readable table comes first
    summary = json.loads(lines[-1])
    assert summary["quick"] is True
    return summary


def _assert_positive_numbers(summary: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = summary[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key
        assert math.isfinite(value) and value > 0, (key, value)


def test_round_quick_reports_ratio_and_critical_path_share(
    capsys: pytest.CaptureFixture[str],
) -> None:
    summary = _quick_summary(round_bench.main, capsys)
    _assert_positive_numbers(summary, ("ratio_vs_reference", "critical_path_share"))


def test_scale_quick_reports_its_headline_and_every_agent_finishes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    summary = _quick_summary(scale.main, capsys)
    _assert_positive_numbers(summary, ("agents", "rounds", "p99_ms", "rss_mib"))
    # The lightweight agents speak the protocol well enough for the real engine to finish.
    run = summary["runs"][-1]
    assert run["status"] == "completed"
    assert run["agents_completed"] == summary["agents"]
    assert run["min_rounds_applied"] == summary["rounds"]
