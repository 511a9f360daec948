"""Zero-copy msgpack frames: bytes exactly as ``msgpack.packb`` writes them, and decoded values
exactly as ``msgpack.unpackb`` reads them, but with tensor payloads copied at most once.

``packb`` splices each large ``bin`` payload straight into the frame. ``unpackb`` scans a large
immutable frame for the ``bin`` values under ``"data"`` keys (the tensors of the wire protocol)
and returns them as read-only views of the frame. Pure: msgpack and the standard library only.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

__all__ = ["packb", "unpackb"]

# The bytes are exactly what msgpack.packb writes. But packb copies a payload twice (into its
# buffer, then into the result) and unpackb once (into a new bytes object); here encoding copies
# each tensor once, straight into the frame, and decoding returns read-only views of the frame.

_SPLICE_MIN_BYTES = 512  # smaller payloads are copied as usual
# Finding the payloads costs ~0.2 us an object (in Python): smaller frames, and frames with more
# than one object per 4 KiB, are cheaper to copy with msgpack than to walk.
_VIEW_MIN_BYTES = 256 << 10
_UNPACK_OPTIONS: dict[str, Any] = {"raw": False, "strict_map_key": True}
_PLACEHOLDER = b"\xd6\x00"  # fixext 4 of type 0 + a payload index; exists only in shadow frames
_DATA_KEY = b"\xa4data"  # the key "data" as msgpack writes it


def _scan_table() -> list[tuple[int, int, struct.Struct | None] | None]:
    """Per msgpack format byte: (kind, length, length field if any). Kinds: 0 other (``length``
    bytes follow), 1 bin, 2 map (pairs), 3 array; None: ext types (refused) and unused 0xC1."""
    table: list[tuple[int, int, struct.Struct | None] | None] = [None] * 256
    for code in (*range(0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3):
        table[code] = (0, 0, None)
    for n in range(32):
        table[0xA0 + n] = (0, n, None)  # fixstr
        table[0x80 + n] = (2 + n // 16, n % 16, None)  # fixmap 0x80-0x8F, fixarray 0x90-0x9F
    for code, n in zip(range(0xCA, 0xD4), (4, 8, 1, 2, 4, 8, 1, 2, 4, 8)):
        table[code] = (0, n, None)  # float 32/64, uint 8-64, int 8-64
    fields = [struct.Struct(f) for f in (">B", ">H", ">I")]
    for kind, first, count in ((1, 0xC4, 3), (0, 0xD9, 3), (3, 0xDC, 2), (2, 0xDE, 2)):
        for i in range(count):  # bin and str have 8/16/32-bit lengths, array and map 16/32
            table[first + i] = (kind, 0, fields[i + 3 - count])
    return table


_SCAN = _scan_table()


def _pack(obj: Any, packer: msgpack.Packer, pieces: list[Any], depth: int = 0) -> None:
    if isinstance(obj, memoryview) and obj.nbytes >= _SPLICE_MIN_BYTES:
        wide = obj.nbytes >= 1 << 16  # bin 32, else bin 16: the header msgpack would write
        head = (b"\xc6" if wide else b"\xc5") + obj.nbytes.to_bytes(4 if wide else 2, "big")
        pieces += (packer.bytes(), head, obj)
        packer.reset()
    elif isinstance(obj, dict) and depth < 3:  # message > tensors map > tensor: no deeper
        packer.pack_map_header(len(obj))
        for key, value in obj.items():
            packer.pack(key)
            _pack(value, packer, pieces, depth + 1)
    else:
        packer.pack(obj)


def packb(obj: Any) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)`` byte for byte; tensor data copied once."""
    packer = msgpack.Packer(use_bin_type=True, autoreset=False)
    pieces: list[Any] = []
    _pack(obj, packer, pieces)
    pieces.append(packer.bytes())
    return b"".join(pieces)


def _tensor_payloads(buf: memoryview, max_objects: int) -> list[tuple[int, int, int]] | None:
    """(header, start, stop) of each large `bin` under a "data" key; None if ``buf`` is not one
    msgpack object without ext types, or has too many objects: then msgpack alone decodes it."""
    spans: list[tuple[int, int, int]] = []
    end, pos, here = len(buf), 0, 0
    left, in_map = 1, False  # the open container: objects still to come (a pair is two), kind
    stack: list[tuple[int, bool]] = []
    for _ in range(max_objects):
        while not left:
            if not stack:
                return spans if pos == end else None
            left, in_map = stack.pop()
        step = _SCAN[buf[pos]] if pos < end else None
        if step is None:
            return None
        kind, size, field = step
        left -= 1
        prev, here, start = here, pos, pos + 1
        if field is not None:
            start += field.size
            if start > end:
                return None
            (size,) = field.unpack_from(buf, pos + 1)
        if kind >= 2:
            stack.append((left, in_map))
            left, in_map, pos = size * (4 - kind), kind == 2, start
            continue
        # A map value (even count left) right after the key "data". Keys are scalars in every
        # frame msgpack accepts (strict_map_key), so the previous object is that key.
        if kind == 1 and size >= _SPLICE_MIN_BYTES and in_map and not left & 1:
            if buf[prev:pos] == _DATA_KEY:
                spans.append((pos, start, start + size))
        pos = start + size
    return None


def unpackb(frame: Any) -> Any:
    """``msgpack.unpackb`` with this protocol's options; tensor data as views of the frame.

    Each large payload is replaced by an ext placeholder in a small shadow frame, which msgpack
    decodes and validates as usual. Only immutable frames are viewed: a view of a buffer its
    owner may still change (a bytearray) would change the decoded tensors.
    """
    view = memoryview(frame) if isinstance(frame, (bytes, memoryview)) else None
    spans = None
    if view is not None and view.readonly and view.c_contiguous and view.nbytes >= _VIEW_MIN_BYTES:
        view = view.cast("B")
        spans = _tensor_payloads(view, len(view) >> 12)
    if not spans or view is None:
        return msgpack.unpackb(frame, max_ext_len=0, **_UNPACK_OPTIONS)
    payloads = [view[start:stop] for _, start, stop in spans]
    pieces: list[Any] = []
    prev = 0
    for index, (head, _, stop) in enumerate(spans):
        pieces += (view[prev:head], _PLACEHOLDER + index.to_bytes(4, "big"))
        prev = stop
    pieces.append(view[prev:])
    try:
        return msgpack.unpackb(
            b"".join(pieces),
            ext_hook=lambda _type, index: payloads[int.from_bytes(index, "big")],
            **_UNPACK_OPTIONS,
        )
    except Exception:
        # Let msgpack judge the frame itself, so that errors read the same on either path.
        return msgpack.unpackb(frame, max_ext_len=0, **_UNPACK_OPTIONS)
