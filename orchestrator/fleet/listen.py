"""The orchestrator's WebSocket listeners: the one at ``testbed.listen``, and (with
``testbed.link_shaper = "kernel"``) one at the host end of each local agent's veth pair, all
serving the same admission with the same limits.

The listening sockets are bound here rather than by the event loop, so that each is a
:class:`~orchestrator.fleet.gate.ScreenedSocket`: a penalised source, or a flood far past the
pending cap, is reset inside ``accept`` before it costs a transport or a handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

from orchestrator.config.manifest import Manifest
from orchestrator.fleet.admission import Admission
from orchestrator.fleet.gate import PendingGate, ScreenedSocket

HANDSHAKE_TIMEOUT_S = 10.0  # a peer that has not finished its WebSocket opening by then is dropped
CLOSE_TIMEOUT_S = 5.0  # the closing handshake's bound; a silent peer is then cut off


class Listening(NamedTuple):
    """What a listener serves on: its sockets (one per address bound)."""

    sockets: tuple[Any, ...]


@contextlib.asynccontextmanager
async def listener(
    m: Manifest,
    admission: Admission,
    gate: PendingGate,
    ssl_context: ssl.SSLContext | None,
    host: str | Sequence[str],
    port: int,
) -> AsyncIterator[Listening]:
    """websockets' ``serve`` on ``host`` (one address, or several: a socket each) and ``port``,
    until the context exits. Binding raises OSError (the address taken, not this machine's)."""
    from websockets.asyncio.server import serve

    socks = await bind(host, port, gate)
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        try:
            while socks:
                sock = socks.pop(0)
                srv = serve(
                    admission.handler,
                    sock=sock,
                    create_connection=gate.connection_class(),  # counts connections from accept
                    compression=None,  # dense float tensors do not deflate; it would only cost CPU
                    max_size=m.testbed.max_message_bytes,
                    ping_interval=m.testbed.ping_interval_s,
                    ping_timeout=m.testbed.ping_timeout_s,
                    open_timeout=HANDSHAKE_TIMEOUT_S,
                    close_timeout=CLOSE_TIMEOUT_S,
                    ssl=ssl_context,  # with TLS on, a plain ws:// client fails its handshake
                )
                servers.append(await stack.enter_async_context(srv))
        finally:
            for sock in socks:  # not yet handed to a server when another failed
                sock.close()
        yield Listening(tuple(s for srv in servers for s in srv.sockets))


async def bind(host: str | Sequence[str], port: int, gate: PendingGate) -> list[ScreenedSocket]:
    """Sockets bound to every address ``host`` resolves to (as the event loop's own
    ``create_server`` binds them: SO_REUSEADDR, IPv6 sockets IPv6-only), screened by ``gate``."""
    loop = asyncio.get_running_loop()
    infos = []
    for h in [host] if isinstance(host, str) else host:
        flags = socket.AI_PASSIVE
        infos += await loop.getaddrinfo(h or None, port, type=socket.SOCK_STREAM, flags=flags)
    socks: list[ScreenedSocket] = []
    try:
        seen = set()
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = ScreenedSocket(family, kind, proto)
            sock.gate = gate
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks
