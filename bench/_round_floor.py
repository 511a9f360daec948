"""The floor of ``bench.round``: the same frames as a round's forward, through a bare WebSocket
peer with no model, and the cost of one ``asyncio.to_thread`` hop, on this machine now.

What the distributed engine's round time cannot go below: ``docs/performance.md`` compares
the two.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import time
from typing import Any

import numpy as np

FLOOR_TRIPS = 300
START_TIMEOUT_S = 60.0  # the peer is a spawned interpreter: imports numpy and websockets


def _peer(url: str, act_shape: tuple[int, int], hops: list[int]) -> None:
    """Agent side of the floor: answer each round with an activations frame, no model at all.
    One connection per entry of ``hops``: that many thread hops before each reply, as the agent
    makes two (``trainer.forward``, then ``pad_compute``) before it encodes its reply."""
    from websockets.asyncio.client import connect

    from edge_agent import protocol

    acts = np.random.default_rng(0).standard_normal(act_shape).astype(np.float32)
    labels = np.zeros(act_shape[0], np.int64)

    async def serve() -> None:
        for n in hops:
            async with connect(url, compression=None, max_size=1 << 26) as ws:
                async for frame in ws:
                    msg = protocol.decode(frame, protocol.ORCHESTRATOR_TYPES)
                    if msg.type == "bye":
                        break
                    for _ in range(n):
                        await asyncio.to_thread(time.perf_counter)
                    reply = protocol.encode(
                        "activations", round=msg["round"], x=acts, y=labels, compute_s=0.0
                    )
                    await ws.send(reply)

    asyncio.run(serve())


async def _floor_async(act_shape: tuple[int, int], hops: list[int], trips: int) -> list[float]:
    from websockets.asyncio.server import serve

    from edge_agent import protocol

    medians: list[float] = []
    done = asyncio.Event()

    async def handler(ws: Any) -> None:  # the orchestrator's side of SessionGroup.forward
        samples = []
        for r in range(1, trips + 1):
            t0 = time.perf_counter()
            await ws.send(protocol.encode("round", round=r, batch_size=act_shape[0]))
            protocol.decode(await ws.recv(), protocol.AGENT_TYPES)
            samples.append(time.perf_counter() - t0)
        await ws.send(protocol.encode("bye", reason="completed"))
        medians.append(statistics.median(samples[trips // 10 :]))  # after a warm-up
        if len(medians) == len(hops):
            done.set()

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=1 << 26) as server:
        port = server.sockets[0].getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        peer = ctx.Process(target=_peer, args=(f"ws://127.0.0.1:{port}", act_shape, hops))
        peer.start()
        try:
            await asyncio.wait_for(done.wait(), START_TIMEOUT_S + trips)
        finally:
            peer.join(10)
            if peer.is_alive():
                peer.terminate()
    return medians


def floor_ms(act_shape: tuple[int, int], trips: int = FLOOR_TRIPS) -> dict[str, float]:
    """Median request-to-reply milliseconds through a bare peer, with 0 and 2 thread hops, and
    the median cost of one ``asyncio.to_thread`` hop on this machine now."""
    no_hop, two_hops = asyncio.run(_floor_async(act_shape, [0, 2], trips))

    async def hop() -> float:
        samples = []
        for _ in range(trips):
            t0 = time.perf_counter()
            await asyncio.to_thread(time.perf_counter)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    return {"ws_trip": 1e3 * no_hop, "ws_trip_2_hops": 1e3 * two_hops,
            "to_thread_hop": 1e3 * asyncio.run(hop())}  # fmt: skip
