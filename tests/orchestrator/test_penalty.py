"""Per-source penalties: a source that keeps failing before admission is reset at accept for a
while (longer on repeat, bounded), is let in again after it, never harms a source a listed device
was admitted from, and its keys are checked like every other manifest key."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from edge_agent.protocol import PROTOCOL_VERSION, encode
from orchestrator.config.manifest import parse_manifest
from orchestrator.errors import ManifestError
from orchestrator.fleet.admission import Admission
from orchestrator.fleet.gate import RESET_PENALISED, PendingGate
from orchestrator.fleet.listen import listener
from orchestrator.fleet.penalty import FAILURE_WINDOW_S, MAX_SOURCES, PenaltyBox
from orchestrator.fleet.sessions import DeviceSession

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
DEVICE = '[[devices]]\nid = "d"\ntoken = "t"\n'


class Clock:
    """A monotonic clock the test moves by hand: no test waits out a penalty."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the rule, on a hand-moved clock -----------------------------------------------------------


def test_penalties_start_at_the_nth_failure_double_on_repeat_and_stay_bounded() -> None:
    clock = Clock()
    given: list[tuple[str, dict[str, Any]]] = []
    box = PenaltyBox(3, 10.0, 35.0, lambda h, f: given.append((h, f)), clock=clock)
    assert not box.failed("a") and not box.failed("a") and not box.blocked("a")
    assert box.failed("a") and box.blocked("a") and not box.blocked("b")
    assert given == [("a", {"failures": 3, "penalty_s": 10.0, "repeat": 1})]
    assert not box.failed("a")  # a failure while penalised (an older connection) adds nothing
    for expected in (20.0, 35.0, 35.0):  # doubled on each repeat, never past penalty_max_s
        clock.now += given[-1][1]["penalty_s"] + 0.1
        assert not box.blocked("a")
        for _ in range(3):
            box.failed("a")
        assert given[-1][1]["penalty_s"] == expected and box.blocked("a")
    # quiet for penalty_max_s after its last penalty: the next one starts small again
    clock.now += 35.0 + 35.0 + 1
    for _ in range(3):
        box.failed("a")
    assert given[-1][1] == {"failures": 3, "penalty_s": 10.0, "repeat": 1}


def test_slow_failures_admitted_sources_and_off_are_never_penalised() -> None:
    clock = Clock()
    box = PenaltyBox(2, 10.0, 60.0, clock=clock)
    for _ in range(5):  # one failure per window never adds up
        assert not box.failed("slow")
        clock.now += FAILURE_WINDOW_S + 1
    box.failed("lab")
    box.admitted("lab")  # a listed device came in from there: NAT, or a stale token next door
    assert not any(box.failed("lab") for _ in range(10)) and not box.blocked("lab")
    off = PenaltyBox(0, 10.0, 60.0, clock=clock)
    assert not any(off.failed("x") for _ in range(10))
    for k in range(MAX_SOURCES + 10):  # many sources: the table stays bounded
        box.failed(f"10.0.{k // 256}.{k % 256}")
    assert len(box._sources) <= MAX_SOURCES


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("penalty_after = -1", "[testbed].penalty_after: must be >= 0, got -1"),
        ("penalty_s = 0", "[testbed].penalty_s: must be > 0, got 0.0"),
        ("penalty_max_s = 5.0", "[testbed].penalty_max_s: is 5.0, below testbed.penalty_s (10.0)"),
    ],
)
def test_manifest_errors_name_the_key(key: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(f"[testbed]\n{key}\n{DEVICE}", source="testbed.toml")
    assert str(info.value) == f"testbed.toml: {expected}"


# --- real sockets ------------------------------------------------------------------------------


async def attempt(url: str, source: str, token: str | None) -> str:
    """Dial from ``source``; say hello with ``token`` (None: say nothing). The close code the
    orchestrator ended with, "admitted" when it answered with a frame, or "reset"."""
    from websockets.asyncio.client import connect

    try:
        ws = await asyncio.wait_for(connect(url, local_addr=(source, 0), ping_interval=None), 5)
    except (OSError, asyncio.TimeoutError, Exception):
        return "reset"
    async with ws:
        if token is not None:
            hello = encode(
                "hello",
                protocol=PROTOCOL_VERSION,
                device_id="d",
                token=token,
                facts={},
                resume=None,
            )
            await ws.send(hello)
        try:
            await asyncio.wait_for(ws.recv(), 5 * SCALE)
            if token == "t":
                return "admitted"
            await asyncio.wait_for(ws.wait_closed(), 5 * SCALE)
        except Exception:
            pass
    return str(ws.close_code)


def test_a_failing_source_is_reset_at_accept_for_its_penalty_then_let_in_again() -> None:
    m = parse_manifest(DEVICE)
    clock = Clock()
    events: list[tuple[str, dict[str, Any]]] = []
    box = PenaltyBox(3, 10.0, 600.0, lambda h, f: events.append(("penalised", {"peer": h, **f})))
    box.clock = clock
    resets: list[tuple[str, str]] = []
    gate = PendingGate(16, lambda peer, reason: resets.append((peer, reason)), box)
    sessions = {"d": DeviceSession(m.devices[0], 0)}
    admission = Admission(
        sessions,
        "run",
        lambda s: b"\x80",  # any frame: the test only sees that one came
        lambda e, d, f: events.append((e, f)),
        lambda s: None,
        gate=gate,
        hello_timeout_s=0.3 * SCALE,
    )

    async def main() -> None:
        async with asyncio.timeout(60 * SCALE):
            async with listener(m, admission, gate, None, "127.0.0.1", 0) as served:
                url = f"ws://127.0.0.1:{served.sockets[0].getsockname()[1]}"
                # three wrong tokens from 127.0.0.2: refused 1008, then penalised
                assert [await attempt(url, "127.0.0.2", "wrong") for _ in range(3)] == ["1008"] * 3
                assert [e for e in events if e[0] == "penalised"] == [
                    (
                        "penalised",
                        {"peer": "127.0.0.2", "failures": 3, "penalty_s": 10.0, "repeat": 1},
                    )
                ]
                assert await attempt(url, "127.0.0.2", "wrong") == "reset"
                assert await attempt(url, "127.0.0.2", "t") == "reset"  # even with the token
                assert resets and resets[-1][1] == RESET_PENALISED
                assert resets[-1][0].startswith("127.0.0.2:")
                # another source is served as ever meanwhile, and a listed device admitted
                assert await attempt(url, "127.0.0.3", "wrong") == "1008"
                assert await attempt(url, "127.0.0.1", "t") == "admitted"
                # the penalty over, the source is let in again; failing on, penalised longer
                clock.now += 10.1
                assert await attempt(url, "127.0.0.2", "wrong") == "1008"
                idle = [attempt(url, "127.0.0.2", None) for _ in range(2)]
                assert await asyncio.gather(*idle) == ["1002", "1002"]  # no hello in time
                assert await attempt(url, "127.0.0.2", "wrong") == "reset"
                assert [f["penalty_s"] for e, f in events if e == "penalised"] == [10.0, 20.0]
                # the source a listed device was admitted from is never penalised
                assert [await attempt(url, "127.0.0.1", "wrong") for _ in range(5)] == ["1008"] * 5

    asyncio.run(main())
    assert len(resets) == 3 and all(r == RESET_PENALISED for _, r in resets)
