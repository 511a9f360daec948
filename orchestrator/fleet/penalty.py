"""Per-source penalties: a source address that keeps failing before admission is refused at accept.

After OpenSSH's ``PerSourcePenalties``: refusing a wrong-token hello costs the event loop the
WebSocket handshake, the decode, the token check, an error frame and the closing handshake
(about a millisecond each, docs/performance.md), so a source that has failed
``testbed.penalty_after`` times within :data:`FAILURE_WINDOW_S` has its next connections reset
at accept (``orchestrator.fleet.gate.ScreenedSocket``) for ``testbed.penalty_s``, twice as long
each time it is penalised again soon after, up to ``testbed.penalty_max_s``
(docs/protocol.md, *Connection limits*).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from edge_agent import protocol

# The closes before admission that count against a source: bad token or unknown device, no
# hello in time or a first frame out of protocol, undecodable, invalid, or too large. Not 1013:
# a device dialling in during a flood is told that through no fault of its own.
FAILURE_CODES = frozenset(
    {
        protocol.CLOSE_PROTOCOL_ERROR,  # 1002
        protocol.CLOSE_UNSUPPORTED_DATA,  # 1003
        protocol.CLOSE_INVALID_PAYLOAD,  # 1007
        protocol.CLOSE_POLICY_VIOLATION,  # 1008
        protocol.CLOSE_MESSAGE_TOO_BIG,  # 1009
    }
)
# Failures are counted from a source's first one; fewer than penalty_after in this long are
# forgotten. A device retrying a stale token with the agent's backoff stays well below it.
FAILURE_WINDOW_S = 60.0
# At most this many sources are remembered (failing or penalised): a flood from many addresses
# forgets its oldest first instead of growing the table.
MAX_SOURCES = 4096


@dataclass
class _Source:
    """A source's failures in its current window, and its penalties so far."""

    since: float  # the first failure of the current window
    failures: int = 0
    strikes: int = 0  # penalties so far: the next one lasts penalty_s * 2**strikes
    last_until: float = 0.0  # when the latest penalty ended (or ends)


class PenaltyBox:
    """Counts failures per source host and says which hosts are penalised now.

    ``failed(host)`` counts a failure and penalises the host at the ``after``-th one within
    :data:`FAILURE_WINDOW_S`: ``base_s`` the first time, doubled for each penalty that follows
    within ``max_s`` of the previous one's end, never more than ``max_s``. ``on_penalty(host,
    fields)`` is called once per penalty. ``admitted(host)`` exempts a host for the rest of the
    run: a listed device proved itself from there, and whoever shares its address (NAT, the
    local agents' loopback) is bounded by the pending cap instead. ``after = 0``: no penalties.
    """

    def __init__(
        self,
        after: int,
        base_s: float,
        max_s: float,
        on_penalty: Callable[[str, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.after = after
        self.base_s = base_s
        self.max_s = max_s
        self.on_penalty = on_penalty
        self.clock = clock
        self.penalties = 0  # penalties given, all sources
        self._sources: dict[str, _Source] = {}  # oldest first: the order eviction takes
        self._until: dict[str, float] = {}  # host -> penalised until; all that accept reads
        self._trusted: set[str] = set()

    def blocked(self, host: str) -> bool:
        """Whether ``host`` is penalised now (a dict lookup: this runs for every accept)."""
        until = self._until.get(host)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self._until[host]
        return False

    def admitted(self, host: str) -> None:
        """A listed device was admitted from ``host``: never penalise it in this run."""
        self._trusted.add(host)
        self._sources.pop(host, None)
        self._until.pop(host, None)

    def failed(self, host: str) -> bool:
        """Count a failure of ``host``; True when it made the host penalised."""
        if self.after <= 0 or host in self._trusted or self.blocked(host):
            return False  # a failure while penalised: a connection from before the penalty
        now = self.clock()
        src = self._sources.pop(host, None)  # put back last: most recently failed
        if src is None:
            if len(self._sources) >= MAX_SOURCES:
                del self._sources[next(iter(self._sources))]
            src = _Source(since=now)
        if now - src.since > FAILURE_WINDOW_S:
            src.since, src.failures = now, 0
        if src.strikes and now - src.last_until > self.max_s:
            src.strikes = 0  # quiet for long enough: the next penalty starts small again
        src.failures += 1
        self._sources[host] = src
        if src.failures < self.after:
            return False
        duration = min(self.base_s * 2 ** min(src.strikes, 32), self.max_s)
        src.strikes += 1
        src.since, src.failures, src.last_until = now, 0, now + duration
        if len(self._until) >= MAX_SOURCES:
            self._forget_ended(now)
        self._until[host] = now + duration
        self.penalties += 1
        if self.on_penalty is not None:
            fields = {"failures": self.after, "penalty_s": duration, "repeat": src.strikes}
            self.on_penalty(host, fields)
        return True

    def _forget_ended(self, now: float) -> None:
        """Drop penalties that have ended; if all still run, the one given longest ago."""
        for host in [h for h, until in self._until.items() if until <= now]:
            del self._until[host]
        if len(self._until) >= MAX_SOURCES:
            del self._until[next(iter(self._until))]
