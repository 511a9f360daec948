"""The run's vocabulary: its phases and its devices' statuses, named once as ``str`` enums.

A leaf module (it imports nothing of the project), so every layer may use it — the fleet sets a
session's status, the training loop the run's phase, the dashboard shows both — without any of
them importing another. The members are ``str``: they compare equal to, hash like and serialise
to JSON as today's strings, so records and snapshots that hold the plain strings stay valid.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["DeviceStatus", "Phase"]


class _Name(str, Enum):
    """A ``str`` enum whose ``str()`` and f-string form is its value (``"lost"``, not
    ``"DeviceStatus.LOST"``): event text and log lines print the word itself."""

    def __str__(self) -> str:
        return str(self.value)


class Phase(_Name):
    """Where a run is; the dashboard's header and ``summary.json``'s final ``status``."""

    WAITING = "waiting"  # listening, the fleet not yet holding the job
    TRAINING = "training"
    EVALUATING = "evaluating"
    # The training loop's stop at a round boundary (SIGINT) while it writes its checkpoint; the
    # dashboard's PHASES tuple lacks it, but the loop sets it, so the vocabulary must hold it.
    CHECKPOINTING = "checkpointing"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        """Whether the run has ended in this phase (``summary.json`` is written with it)."""
        return self in _FINAL_PHASES


_FINAL_PHASES = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.INTERRUPTED})


class DeviceStatus(_Name):
    """What one device is doing, as the fleet table shows it."""

    WAITING = "waiting"  # listed in the manifest, not connected yet
    JOINED = "joined"  # admitted (hello and token checked); idle between requests
    COMPUTING = "computing"  # asked for this round's activations
    SENDING = "sending"
    STRAGGLING = "straggling"  # missed a round's deadline and was told to skip it
    LOST = "lost"  # its connection went away; it may dial back
    DONE = "done"  # the run ended and the device was told bye
