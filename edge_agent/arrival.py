"""When each message from the orchestrator began to arrive, for the emulated downlink.

A large frame takes real time to cross even a loopback socket, more on a busy machine; timed
from its last byte, the emulated link would add that time to its own, and its measured rate
would fall short of the one set. The kernel's shaper (tbf) never pays it twice: it is timed
from the first byte, as here.
"""

from __future__ import annotations

import time

from websockets.asyncio.client import ClientConnection

# RFC 6455 section 5.2: the low nibble of a frame's first byte is its opcode; 0x8 and up are
# control frames (close, ping, pong), which websockets answers itself and which start no message.
_CONTROL = 0x8


class StampedConnection(ClientConnection):
    """A client connection that notes when the bytes of the next message began to arrive.

    The stamp is taken at the first chunk read after the previous message was handed over, so
    it is never earlier than the true first byte of the message it is given to: a chunk that
    begins with a control frame is passed over, and a message that arrived whole behind another
    one gets no stamp (its reader falls back to the time it was handed over).
    """

    first_byte: float | None = None

    def data_received(self, data: bytes) -> None:
        if self.first_byte is None and data and data[0] & 0x0F < _CONTROL:
            self.first_byte = time.monotonic()
        super().data_received(data)
