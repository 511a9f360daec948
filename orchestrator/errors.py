"""The orchestrator's exception root and its process exit codes.

Every error the orchestrator raises on purpose derives from one root, so the CLI can turn any of
them into a one-line message and an exit code without a traceback::

    GapslError                 anything the testbed reports to its user             exit 1
    ├── ManifestError          a manifest key or --set override is wrong; names it  exit 2
    ├── PreflightError         preflight.py: a run cannot start here (a --run-dir
    │                          that holds files); names the file                    exit 2
    ├── FleetError             devices did not join, or too few remain for the run  exit 1
    ├── RunError               a run failed after it started (training, records)    exit 1
    ├── RunInterrupted         SIGINT/SIGTERM stopped training at a round boundary  exit 130
    ├── CheckpointError        records/checkpoint.py: a checkpoint that cannot be
    │                          read, or is not this testbed's (--resume)            exit 1
    └── TlsError               fleet/tls.py: a certificate or key cannot be made or
        │                      used; the message names the file or host             exit 2
        └── TlsFilesExistError tls-init would overwrite files (--force allows it)   exit 2

The preflights (``orchestrator/preflight.py``: data, model and cut, listen port, TLS files)
report a value that cannot work on this machine as a ManifestError naming its key, before any
run directory exists. The exit code of each class is its ``exit_code`` attribute. Inside a run
the engine catches them all: the run's ``summary.json`` says ``failed`` (or ``interrupted``)
with the message as its ``error``, and ``run`` exits 1 (or 130).

Not under the root, on purpose:

- ``DeviceAbsent`` (fleet/sessions.py): not an error but a per-request signal ("this device is
  away past testbed.patience_s, or lost the round") that ``SessionGroup`` always turns into "the
  device sits out". Under the root, a forgotten ``except`` would become a one-line run failure at
  the engine's ``except GapslError`` instead of the traceback our bug deserves.
- The edge agent's errors (``edge_agent.protocol.ProtocolError``, ``edge_agent.compress.
  CompressionError``, ``edge_agent.datasets.DataError``, ...): the agent never imports the
  orchestrator. The fleet turns a ProtocolError into a close code and an event, a
  CompressionError into a RunError naming the device.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar

__all__ = [
    "ExitCode",
    "FleetError",
    "GapslError",
    "ManifestError",
    "PreflightError",
    "RunError",
    "RunInterrupted",
    "exit_code_help",
]


class ExitCode(IntEnum):
    """Process exit status of ``gapsl-orchestrator`` (``gapsl-agent`` has ``AgentExit``)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    INCOMPLETE = 3  # watch --once: the run has no final status (still going, or was killed)
    INTERRUPTED = 130  # 128 + SIGINT, the shell convention for a Ctrl-C'd process


_MEANINGS = {
    ExitCode.OK: "the command finished",
    ExitCode.FAILED: "the run failed (devices missing, training or records failed)",
    ExitCode.USAGE: "bad manifest or bad command-line usage; the message names the key",
    ExitCode.INCOMPLETE: "watch --once: the run has not ended (still going, or was killed)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); the run is marked interrupted",
}


def exit_code_help() -> str:
    """The exit codes as a short block of text, for a command's ``--help`` epilog."""
    lines = ["exit codes:"]
    lines += [f"  {code.value:<4} {code.name.lower():<12} {_MEANINGS[code]}" for code in ExitCode]
    return "\n".join(lines)


class GapslError(Exception):
    """Root of every error the testbed reports to its user (message only, no traceback)."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILED


class ManifestError(GapslError):
    """A manifest key is wrong. ``str()`` gives the house format naming the key.

    ``source`` is the manifest's file name, ``"<string>"`` or ``"--set"`` (when the bad value
    came from a command-line override); ``key`` is the dotted path of the key, e.g.
    ``devices.pi-03.token``, or ``""`` for a problem with the file as a whole (unreadable, not
    valid TOML); ``problem`` says what is wrong.
    """

    exit_code = ExitCode.USAGE

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


class PreflightError(GapslError):
    """A run cannot start here for a reason outside the manifest's keys (its run directory)."""

    exit_code = ExitCode.USAGE


class FleetError(GapslError):
    """The fleet cannot support the run: devices did not join in time, or too few remain."""


class RunInterrupted(GapslError):
    """The run was asked to stop (SIGINT/SIGTERM) and stopped at a round boundary."""

    exit_code = ExitCode.INTERRUPTED


class RunError(GapslError):
    """A run failed after it started: training diverged, a record could not be written, ..."""
