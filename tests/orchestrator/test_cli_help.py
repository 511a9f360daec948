"""Every command's ``--help`` gives a command line to copy and the defaults of its options, and
``--debug`` is accepted before or after the command."""

from __future__ import annotations

import argparse

import pytest

from orchestrator.cli import EXAMPLES, _parser
from orchestrator.errors import exit_code_help


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (found,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found)


# (command, a default its help must show)
DEFAULTS = [
    ("run", "(default: testbed.toml)"),
    ("simulate", "(default: testbed.toml)"),
    ("check", "(default: testbed.toml)"),
    ("report", "default: RUN_DIR/report"),
    ("watch", "(default: terminal)"),
    ("tls-init", "(default: 825)"),
]


def test_every_command_is_covered() -> None:
    assert sorted(_commands()) == sorted(c for c, _ in DEFAULTS) == sorted(EXAMPLES)


@pytest.mark.parametrize(("command", "default"), DEFAULTS)
def test_help_shows_an_example_and_the_defaults(
    command: str, default: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse re-wraps lines
    assert f"example: gapsl-orchestrator {command} " in text
    assert default in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert " ".join(exit_code_help().split()) in text  # the exit codes stay last
    assert text.index("example:") < text.index("exit codes:")


def test_debug_goes_before_or_after_the_command() -> None:
    parser = _parser()
    assert parser.parse_args(["--debug", "check"]).debug is True
    assert parser.parse_args(["check", "--debug"]).debug is True
    assert parser.parse_args(["check"]).debug is False
