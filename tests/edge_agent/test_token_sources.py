"""Where ``gapsl-agent`` takes its token from: ``--token``, ``--token-file`` or ``$GAPSL_TOKEN``.

The last two keep it off the command line, which every user of the host can read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.agent import AgentExit
from edge_agent.cli import TOKEN_ENV, _parser, _token, main

BASE = ["--orchestrator", "ws://127.0.0.1:9", "--id", "pi-01"]


def test_each_source_gives_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert _token(_parser().parse_args(BASE)) == "from-env"
    assert _token(_parser().parse_args([*BASE, "--token", "from-flag"])) == "from-flag"
    path = tmp_path / "token"
    path.write_text("from-file\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert _token(_parser().parse_args([*BASE, "--token-file", str(path)])) == "from-file"
    assert not caplog.records
    path.chmod(0o644)  # readable by others: said once, still used
    with caplog.at_level(logging.WARNING):
        assert _token(_parser().parse_args([*BASE, "--token-file", str(path)])) == "from-file"
    assert "chmod 600" in caplog.text and "from-file" not in caplog.text


def test_no_token_at_all_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(BASE) == AgentExit.USAGE
    assert TOKEN_ENV in capsys.readouterr().err
