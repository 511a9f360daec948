"""Transport throughput: activation round trips over a loopback WebSocket against raw TCP.

Run ``python -m bench.transport`` (``--quick`` for a smoke run). A server process answers each
activations frame with a gradients frame of the same size, over WebSockets (the websockets
library, configured as the orchestrator and the agent configure it, plus variants of the
settings that bear on throughput) and over a length-prefixed asyncio TCP stream carrying the same
bytes. The last line of output is a JSON object whose headline ``ratio_vs_tcp`` is the 4 MiB
WebSocket throughput, with the project's settings, over the TCP throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.metadata
import json
import math
import multiprocessing
import multiprocessing.connection
import struct
import sys
import time
from collections.abc import Awaitable
from multiprocessing.connection import Connection
from typing import Any, Callable

from bench.codec import KIB, MIB, activations, machine_info, size_label
from edge_agent.protocol import encode

HOST = "127.0.0.1"
SIZES = (256 * KIB, 4 * MIB, 16 * MIB)
HEADLINE = 4 * MIB
MAX_SIZE = 64 * MIB  # testbed.toml's default max_message_bytes
STREAM_LIMIT = 64 * MIB  # asyncio's default (64 KiB) would pause reading every 128 KiB
START_TIMEOUT_S = 60.0
SAMPLE_TIMEOUT_S = 60.0
_LENGTH = struct.Struct(">I")

# What the orchestrator and the agent pass today (compression off, a large max_size), then the
# settings that could change throughput, one at a time on top of it.
PROJECT = {"compression": None, "max_size": MAX_SIZE, "open_timeout": 10, "close_timeout": 5}
VARIANTS: dict[str, dict[str, Any]] = {
    "project": {},
    "write_limit=1MiB": {"write_limit": MIB},
    "write_limit=32MiB": {"write_limit": 32 * MIB},
    "max_queue=1": {"max_queue": 1},
    "compression=deflate": {"compression": "deflate"},  # the library's default, for contrast
}
QUICK_VARIANTS = ("project", "write_limit=32MiB")


def ws_options(variant: str) -> dict[str, Any]:
    """Keyword arguments for websockets' serve() and connect() in one variant."""
    return {**PROJECT, **VARIANTS[variant]}


def frames(nbytes: int) -> tuple[bytes, bytes]:
    """An activations frame with a tensor of ``nbytes`` and the gradients frame answering it."""
    x, y = activations(nbytes, "float32")
    act = encode("activations", round=1, x=x, y=y, compute_s=0.0)
    return act, encode("gradients", round=1, grad=-x, loss=0.0)


# --- servers -------------------------------------------------------------------------------


async def start_servers(
    stack: contextlib.AsyncExitStack, sizes: tuple[int, ...], variants: list[str]
) -> dict[str, int]:
    """A TCP server and one WebSocket server per variant, closed with ``stack``; their ports.

    Each answers an activations frame of one of ``sizes`` with the matching gradients frame.
    """
    from websockets.asyncio.server import ServerConnection, serve

    replies = {}
    for nbytes in sizes:
        act, grad = frames(nbytes)
        replies[len(act)] = grad

    async def ws_handler(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(replies[len(message)])

    async def tcp_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                await reader.readexactly(length)
                reply = replies[length]
                writer.write(_LENGTH.pack(len(reply)))
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client is done
        finally:
            writer.close()

    tcp = await asyncio.start_server(tcp_handler, HOST, 0, limit=STREAM_LIMIT)
    stack.push_async_callback(tcp.wait_closed)
    stack.callback(tcp.close)
    ports = {"tcp": tcp.sockets[0].getsockname()[1]}
    for name in variants:
        server = await stack.enter_async_context(serve(ws_handler, HOST, 0, **ws_options(name)))
        ports[name] = server.sockets[0].getsockname()[1]
    return ports


def _serve(conn: Connection, sizes: tuple[int, ...], variants: list[str]) -> None:
    asyncio.run(_serve_async(conn, sizes, variants))


async def _serve_async(conn: Connection, sizes: tuple[int, ...], variants: list[str]) -> None:
    async with contextlib.AsyncExitStack() as stack:
        conn.send(await start_servers(stack, sizes, variants))
        # Serve until the parent says stop or goes away (EOFError).
        with contextlib.suppress(EOFError):
            await asyncio.to_thread(conn.recv)


# --- clients -------------------------------------------------------------------------------

Trip = Callable[[bytes], Awaitable[None]]


async def open_clients(stack: contextlib.AsyncExitStack, ports: dict[str, int]) -> dict[str, Trip]:
    """One connection per server in ``ports``, closed with ``stack``; a round trip on each."""
    from websockets.asyncio.client import ClientConnection, connect

    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(HOST, ports["tcp"], limit=STREAM_LIMIT), START_TIMEOUT_S
    )
    stack.callback(writer.close)

    async def tcp_trip(frame: bytes) -> None:
        writer.write(_LENGTH.pack(len(frame)))
        writer.write(frame)
        await writer.drain()
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        await reader.readexactly(length)

    def ws_trip(ws: ClientConnection) -> Trip:
        async def trip(frame: bytes) -> None:
            await ws.send(frame)
            await ws.recv()

        return trip

    trips: dict[str, Trip] = {"tcp": tcp_trip}
    for name, port in ports.items():
        if name != "tcp":
            ws = await stack.enter_async_context(connect(f"ws://{HOST}:{port}", **ws_options(name)))
            trips[name] = ws_trip(ws)
    return trips


async def _sample_s(trip: Trip, frame: bytes, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        await trip(frame)
    return (time.perf_counter() - start) / calls


async def best_round_trip_s(
    trips: dict[str, Trip], frame: bytes, repeats: int, min_sample_s: float
) -> dict[str, float]:
    """Best seconds per round trip on each transport, sampled in interleaved rounds."""
    calls: dict[str, int] = {}
    for name, trip in trips.items():
        await asyncio.wait_for(_sample_s(trip, frame, 2), SAMPLE_TIMEOUT_S)  # warm-up
        n = 1
        while await asyncio.wait_for(_sample_s(trip, frame, n), SAMPLE_TIMEOUT_S) * n < (
            min_sample_s
        ):
            n *= 2
        calls[name] = n
    best = dict.fromkeys(trips, math.inf)
    gc.disable()
    try:
        for _ in range(repeats):
            for name, trip in trips.items():
                sample = _sample_s(trip, frame, calls[name])
                best[name] = min(best[name], await asyncio.wait_for(sample, SAMPLE_TIMEOUT_S))
    finally:
        gc.enable()
    return best


async def _measure(
    ports: dict[str, int], sizes: tuple[int, ...], repeats: int, min_sample_s: float
) -> list[dict[str, Any]]:
    rows = []
    async with contextlib.AsyncExitStack() as stack:
        trips = await open_clients(stack, ports)
        for nbytes in sizes:
            act, _ = frames(nbytes)
            times = await best_round_trip_s(trips, act, repeats, min_sample_s)
            # Tensor bytes moved per second, up and down together (one frame each way).
            mbps = {name: 2 * nbytes / t / 1e6 for name, t in times.items()}
            rows.append(
                {
                    "size_bytes": nbytes,
                    "round_trip_ms": {k: round(t * 1e3, 3) for k, t in times.items()},
                    "mbps": {k: round(v, 1) for k, v in mbps.items()},
                    "ratio_vs_tcp": {k: round(v / mbps["tcp"], 3) for k, v in mbps.items()},
                }
            )
    return rows


async def profile(trips: int) -> None:
    """Both ends in this process under cProfile: where 4 MiB round trips spend their time."""
    import cProfile
    import pstats

    act, _ = frames(HEADLINE)
    async with contextlib.AsyncExitStack() as stack:
        ports = await start_servers(stack, (HEADLINE,), ["project"])
        for name, trip in (await open_clients(stack, ports)).items():
            await asyncio.wait_for(_sample_s(trip, act, 2), SAMPLE_TIMEOUT_S)  # warm-up
            profiler = cProfile.Profile()
            profiler.enable()
            await asyncio.wait_for(_sample_s(trip, act, trips), SAMPLE_TIMEOUT_S)
            profiler.disable()
            print(f"--- {name}: {trips} round trips of a 4 MiB activations frame, both ends")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(10)


def run(sizes: tuple[int, ...], variants: list[str], repeats: int, min_sample_s: float) -> Any:
    """Start the server process, measure every transport, stop the server; returns the rows."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter, as a real peer would be
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child, sizes, variants), daemon=True)
    server.start()
    try:
        # Wait for the ports, or for the server process to die trying.
        if parent not in multiprocessing.connection.wait(
            [parent, server.sentinel], START_TIMEOUT_S
        ):
            raise RuntimeError(f"the server process did not start (exit code {server.exitcode})")
        ports = parent.recv()
        return asyncio.run(_measure(ports, sizes, repeats, min_sample_s))
    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.terminate()
            server.join(10)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table and then the JSON summary as the last line."""
    parser = argparse.ArgumentParser(prog="python -m bench.transport", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument(
        "--profile", action="store_true", help="profile both ends in one process instead"
    )
    parser.add_argument("--repeats", type=int, default=12, help="samples per case (best kept)")
    parser.add_argument(
        "--min-sample-ms", type=float, default=20.0, help="minimum duration of one sample"
    )
    args = parser.parse_args(argv)
    if args.profile:
        asyncio.run(profile(50))
        return 0
    sizes: tuple[int, ...] = SIZES
    variants = list(VARIANTS)
    repeats, min_sample_s = args.repeats, args.min_sample_ms / 1e3
    if args.quick:
        sizes, variants, repeats, min_sample_s = (HEADLINE,), list(QUICK_VARIANTS), 2, 1e-3

    rows = run(sizes, variants, repeats, min_sample_s)
    names = ["tcp", *variants]
    print("MB/s of tensor bytes, both ways (one frame up, one down per round trip); x = vs tcp")
    print(f"{'size':>8}" + "".join(f"{n:>22}" for n in names))
    for row in rows:
        cells = [f"{row['mbps'][n]:.1f} x{row['ratio_vs_tcp'][n]:.2f}" for n in names]
        print(f"{size_label(row['size_bytes']):>8}" + "".join(f"{c:>22}" for c in cells))
    headline = next(r for r in rows if r["size_bytes"] == HEADLINE)
    best = max(variants, key=lambda n: headline["mbps"][n])
    summary = {
        "bench": "transport",
        "ratio_vs_tcp": headline["ratio_vs_tcp"]["project"],
        "headline": "4 MiB round trips: WebSocket (project settings) MB/s / raw TCP MB/s",
        "best_variant": best,
        "best_ratio_vs_tcp": headline["ratio_vs_tcp"][best],
        "project_settings": {k: v for k, v in PROJECT.items()},
        "variants": {n: VARIANTS[n] for n in variants},
        "quick": args.quick,
        "repeats": repeats,
        "machine": {**machine_info(), "websockets": importlib.metadata.version("websockets")},
        "results": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
