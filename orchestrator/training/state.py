"""The run's control state: where the run is and what steers it, not what it shows.

What the dashboard shows is folded from the run's records (``orchestrator.ui.fold``), so every
change here that a person should see is written as a record: each phase change is a ``phase``
event, the run's end its final event (``run_completed``, ``run_failed`` or ``interrupted``).
"""

from __future__ import annotations

import collections
from typing import Any

from orchestrator.names import Phase
from orchestrator.records.writer import FINAL_EVENTS, RunRecords

# Round times kept for the loop's deadlines (it looks at the last few of them).
ROUND_TIMES_KEPT = 64


class RunState:
    """Phase, round, stop flag, message and listen address of one run, and its event log."""

    def __init__(self, records: RunRecords, listen: str) -> None:
        self.records = records
        self.listen = listen  # "HOST:PORT" served, once bound; "in-process" in simulate
        self._phase = Phase.WAITING
        self.round = 0  # the round in progress (the last finished one between rounds)
        self.message = ""
        self.stop_requested = False  # SIGINT/SIGTERM: stop at the next round boundary
        self.round_times: collections.deque[float] = collections.deque(maxlen=ROUND_TIMES_KEPT)

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        """Set the phase; a change is written as a ``phase`` event (with the round), so the
        records alone tell it. A final phase goes through :meth:`finish`, without a reason."""
        phase = Phase(value)
        if phase.final:
            self.finish(phase, "", None)
        elif phase != self._phase:
            self._phase = phase
            self.event("phase", None, {"phase": phase.value, "round": self.round})

    def finish(self, status: str, error: str, wall_s: float | None) -> None:
        """End the run in a final phase: its last event, with the reason and the wall time."""
        phase = Phase(status)
        self._phase, self.message = phase, error
        fields: dict[str, Any] = {"reason": error} if error else {}
        if wall_s is not None:
            fields["wall_s"] = round(wall_s, 3)  # as in summary.json
        self.event(FINAL_EVENTS[phase.value], None, fields)

    def event(
        self, event: str, device: str | None = None, fields: dict[str, Any] | None = None
    ) -> None:
        """Append one event to ``events.jsonl`` (the fleet's and the loop's ``on_event``)."""
        self.records.event(event, device, **(fields or {}))
