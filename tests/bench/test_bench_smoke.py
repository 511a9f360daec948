"""Each benchmark runs end to end in its --quick configuration and ends with its JSON summary.

Only the shape of the output is checked: ratios depend on the machine, so no threshold here.
"""

from __future__ import annotations

import json
from typing import Callable

import pytest

from bench import codec, transport


@pytest.mark.parametrize(
    ("main", "headline"),
    [(codec.main, "ratio_vs_memcpy"), (transport.main, "ratio_vs_tcp")],
    ids=["codec", "transport"],
)
def test_quick_run_ends_with_a_json_summary(
    main: Callable[[list[str]], int], headline: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) > 1  # a human-readable table comes first
    summary = json.loads(lines[-1])
    value = summary[headline]
    assert isinstance(value, float) and value > 0
    assert summary["quick"] is True
    assert summary["machine"]["cpus"] >= 1
