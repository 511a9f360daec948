"""The orchestrator's exception root and its process exit codes.

Every error the orchestrator raises on purpose derives from one root, so the CLI can turn any of
them into a one-line message and an exit code without a traceback::

    GapslError                  anything the testbed reports to its user
    ├── ManifestError           a manifest key (or a --set override) is wrong; names the key
    ├── FleetError              devices did not join, or too few remain for a run to proceed
    └── RunError                a run failed after it started (training, evaluation, records)

Exit codes (``ExitCode``)::

    0    OK           the command finished
    1    FAILED       the run failed (FleetError, RunError)
    2    USAGE        bad manifest or bad command-line usage (ManifestError)
    130  INTERRUPTED  stopped by SIGINT / SIGTERM; the run directory is marked interrupted
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ExitCode",
    "FleetError",
    "GapslError",
    "ManifestError",
    "RunError",
    "exit_code_help",
]


class GapslError(Exception):
    """Root of every error the testbed reports to its user (message only, no traceback)."""


class ManifestError(GapslError):
    """A manifest key is wrong. ``str()`` gives the house format naming the key.

    ``source`` is the manifest's file name, ``"<string>"`` or ``"--set"`` (when the bad value
    came from a command-line override); ``key`` is the dotted path of the key, e.g.
    ``devices.pi-03.token``, or ``""`` for a problem with the file as a whole (unreadable, not
    valid TOML); ``problem`` says what is wrong.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.key:
            return f"{self.source}: {self.problem}"
        section, dot, field = self.key.rpartition(".")
        if not dot:
            return f"{self.source}: {self.key}: {self.problem}"
        return f"{self.source}: [{section}].{field}: {self.problem}"

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[type[ManifestError], tuple[str, str, str]]:
        # The default reduce would call __init__ with the rendered message only.
        return (type(self), (self.source, self.key, self.problem))


class FleetError(GapslError):
    """The fleet cannot support the run: devices did not join in time, or too few remain."""


class RunInterrupted(GapslError):
    """The run was asked to stop (SIGINT/SIGTERM) and stopped at a round boundary."""


class RunError(GapslError):
    """A run failed after it started: training diverged, a record could not be written, ..."""


class ExitCode(IntEnum):
    """Process exit status of the ``gapsl-orchestrator`` and ``gapsl-agent`` commands."""

    OK = 0
    FAILED = 1
    USAGE = 2
    INTERRUPTED = 130  # 128 + SIGINT, the shell convention for a Ctrl-C'd process


_MEANINGS = {
    ExitCode.OK: "the command finished",
    ExitCode.FAILED: "the run failed (devices missing, training or records failed)",
    ExitCode.USAGE: "bad manifest or bad command-line usage; the message names the key",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); the run is marked interrupted",
}


def exit_code_help() -> str:
    """The exit codes as a short block of text, for a command's ``--help`` epilog."""
    lines = ["exit codes:"]
    lines += [f"  {code.value:<4} {code.name.lower():<12} {_MEANINGS[code]}" for code in ExitCode]
    return "\n".join(lines)
