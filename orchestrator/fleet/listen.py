"""The orchestrator's WebSocket listeners: the one at ``testbed.listen``, and (with
``testbed.link_shaper = "kernel"``) one at the host end of each local agent's veth pair, all
serving the same admission with the same limits.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from orchestrator.config.manifest import Manifest
from orchestrator.fleet.admission import Admission
from orchestrator.fleet.gate import PendingGate

HANDSHAKE_TIMEOUT_S = 10.0  # a peer that has not finished its WebSocket opening by then is dropped
CLOSE_TIMEOUT_S = 5.0  # the closing handshake's bound; a silent peer is then cut off


def listener(
    m: Manifest,
    admission: Admission,
    gate: PendingGate,
    ssl_context: ssl.SSLContext | None,
    host: str | Sequence[str],
    port: int,
) -> Any:
    """websockets' ``serve`` on ``host`` (one address, or several: a socket each) and ``port``,
    to be entered as an async context manager."""
    from websockets.asyncio.server import serve

    return serve(
        admission.handler,
        host,  # type: ignore[arg-type]  # loop.create_server binds a socket per host of a list
        port,
        create_connection=gate.connection_class(),  # counts connections from accept
        compression=None,  # dense float tensors do not deflate; it would only cost CPU
        max_size=m.testbed.max_message_bytes,
        ping_interval=m.testbed.ping_interval_s,
        ping_timeout=m.testbed.ping_timeout_s,
        open_timeout=HANDSHAKE_TIMEOUT_S,
        close_timeout=CLOSE_TIMEOUT_S,
        ssl=ssl_context,  # with TLS on, a plain ws:// client fails its handshake
    )
