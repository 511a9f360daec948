"""The agent's link shaper holds its rate when the event loop wakes late, and times received
frames from their first byte: a clock and sleep of the test's own make every wake-up late by
the same amount, so nothing here depends on how busy the machine is."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from edge_agent import arrival
from edge_agent.config import AgentConfig
from edge_agent.emulation import PACE_MIN_BYTES, LinkShaper
from edge_agent.link import Link, first_byte_at

LATE_S = 0.003  # every wake-up this much after the time asked for: a busy 2-core machine
MBPS = 100.0
BYTES_PER_S = MBPS * 1e6 / 8
RTT_MS = 40.0


class LateClock:
    """A clock that moves only when slept on, and oversleeps every sleep by ``LATE_S``."""

    def __init__(self) -> None:
        self.now = 10.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps += 1
        self.now += delay + LATE_S


class FragmentSocket:
    """Takes what a Link sends, noting when (on the test's clock) each fragment went out."""

    def __init__(self, clock: LateClock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes]] = []

    async def send(self, message: Any) -> None:
        if isinstance(message, bytes):
            self.sent.append((self.clock(), message))
            return
        async for piece in message:
            self.sent.append((self.clock(), piece))


def _shaper(clock: LateClock) -> LinkShaper:
    return LinkShaper(MBPS, RTT_MS, clock=clock, sleep=clock.sleep)


def test_back_to_back_frames_keep_the_rate_of_a_late_loop() -> None:
    clock = LateClock()
    shaper = _shaper(clock)
    size, frames = 64 * 1024, 20

    async def scenario() -> None:
        for _ in range(frames):  # each one entered the link as the previous one did
            await shaper.pass_frame(size, entered=10.0)

    asyncio.run(scenario())
    # the lateness of each wake-up is not carried into the next frame's deadline
    assert clock.now - 10.0 == pytest.approx(frames * size / BYTES_PER_S + RTT_MS / 2000 + LATE_S)


def test_a_large_frame_goes_out_paced_and_late_only_once() -> None:
    clock = LateClock()
    ws = FragmentSocket(clock)
    cfg = AgentConfig(url="ws://unused", device_id="d", token="t")
    link = Link(ws, cfg, _shaper(clock), LinkShaper(0, 0))
    frame = bytes(range(256)) * 2048  # 512 KiB

    asyncio.run(link.send(frame))
    assert b"".join(piece for _, piece in ws.sent) == frame
    assert len(ws.sent) > 1 and all(len(p) >= PACE_MIN_BYTES for _, p in ws.sent[:-1])
    # the last byte leaves when the emulated link has passed it, plus one wake-up's lateness,
    # not one per fragment: the real send of each fragment overlaps the shaping of the next
    last, due = ws.sent[-1][0] - 10.0, len(frame) / BYTES_PER_S + RTT_MS / 2000
    assert due <= last <= due + LATE_S + 1e-9
    # every fragment waited for the bytes before it: the rate never runs ahead of the link
    done = 0
    for at, piece in ws.sent:
        done += len(piece)
        assert at - 10.0 >= done / BYTES_PER_S + RTT_MS / 2000


def test_a_small_frame_goes_whole_after_its_delay() -> None:
    clock = LateClock()
    ws = FragmentSocket(clock)
    link = Link(
        ws, AgentConfig(url="ws://u", device_id="d", token="t"), _shaper(clock), _shaper(clock)
    )
    asyncio.run(link.send(b"x" * 100))
    assert [p for _, p in ws.sent] == [b"x" * 100]
    assert ws.sent[0][0] - 10.0 == pytest.approx(100 / BYTES_PER_S + RTT_MS / 2000 + LATE_S)


def test_received_frames_are_stamped_at_their_first_data_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1.0]
    monkeypatch.setattr(arrival, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(ClientConnection, "data_received", lambda self, data: None)
    conn = arrival.StampedConnection.__new__(arrival.StampedConnection)
    conn.data_received(b"\x89\x00")  # a ping starts no message: no stamp
    assert conn.first_byte is None
    now[0] = 2.0
    conn.data_received(b"\x82\x7f" + b"\0" * 100)  # a binary frame's first chunk
    now[0] = 3.0
    conn.data_received(b"\0" * 100)  # the rest of it
    assert first_byte_at(conn) == 2.0
    assert conn.first_byte is None  # the next message is timed afresh
    assert first_byte_at(object()) > 0  # a socket that stamps nothing: now
