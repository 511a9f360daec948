"""Tests for edge_agent.scanner through the protocol: large ``bytes`` frames are decoded without
copying tensor data, and what is on the wire, and what decode returns, is msgpack's all the same."""

from __future__ import annotations

import sys
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.protocol import AGENT_TYPES, ORCHESTRATOR_TYPES, ProtocolError, decode, encode
from edge_agent.scanner import unpackb

from .protocol_helpers import (
    PROPERTY,
    assert_same_tensor,
    close_code,
    decode_every_way,
    pack,
    raw,
)

# --- zero-copy frames ----------------------------------------------------------------------
# Large `bytes` frames are decoded without copying tensor data: the arrays are read-only views
# of the frame. What is on the wire, and what decode returns, must not change because of it.

BIG = 1 << 16  # float32 items: a 256 KiB tensor, a frame large enough to be viewed


def frame_bytes(frame: bytes) -> np.ndarray:
    return np.frombuffer(frame, np.uint8)


@pytest.mark.skipif(sys.byteorder != "little", reason="on big-endian hosts decode must copy")
def test_large_tensors_decode_as_read_only_views_of_the_frame() -> None:
    x = np.arange(BIG, dtype=np.float32).reshape(64, -1)
    y = np.arange(32, dtype=np.int64)  # 256 bytes: copied, too small to be worth a view
    frame = encode("activations", round=1, x=x, y=y, compute_s=0.0)
    msg = decode_every_way(frame, AGENT_TYPES)
    assert np.shares_memory(msg["x"], frame_bytes(frame))
    assert np.shares_memory(decode(memoryview(frame))["x"], frame_bytes(frame))
    assert not msg["x"].flags.writeable
    assert not np.shares_memory(msg["y"], frame_bytes(frame))
    assert_same_tensor(msg["x"], x)
    assert_same_tensor(msg["y"], y)


@pytest.mark.skipif(sys.byteorder != "little", reason="on big-endian hosts decode must copy")
def test_tensor_maps_decode_as_views_too() -> None:
    weights = {"w": np.linspace(-1, 1, BIG, dtype=np.float32), "b": np.ones(3, np.float32)}
    frame = encode("eval_result", round=2, weights=weights, compute_s=0.5)
    msg = decode_every_way(frame, AGENT_TYPES)
    assert np.shares_memory(msg["weights"]["w"], frame_bytes(frame))
    for name, array in weights.items():
        assert_same_tensor(msg["weights"][name], array)


@pytest.mark.skipif(sys.byteorder != "little", reason="on big-endian hosts decode must copy")
def test_frames_written_by_plain_msgpack_decode_as_views() -> None:
    grad = np.linspace(-1, 1, BIG, dtype=np.float32)
    # Another peer may order keys differently; only the msgpack map matters.
    frame = pack(
        {
            "loss": 0.25,
            "grad": {"data": grad.tobytes(), "shape": [BIG], "dtype": "float32"},
            "round": 7,
            "type": "gradients",
        }
    )
    msg = decode_every_way(frame, ORCHESTRATOR_TYPES)
    assert np.shares_memory(msg["grad"], frame_bytes(frame))
    assert_same_tensor(msg["grad"], grad)
    assert (msg["round"], msg["loss"]) == (7, 0.25)


def test_ext_values_are_refused_in_large_frames() -> None:
    # fixext 4 of type 0 is what the decoder itself puts in place of payloads it views.
    placeholder = msgpack.ExtType(0, bytes(4))
    obj = raw("gradients", round=1, grad=np.ones(BIG, np.float32), loss=0.0)
    assert close_code(pack(dict(obj, loss=placeholder))) == 1007
    assert close_code(pack(dict(obj, grad=dict(obj["grad"], data=placeholder)))) == 1007


def plain(obj: Any, key: Any = None) -> Any:
    """``obj`` with views turned into bytes; views may only stand for a "data" value."""
    if isinstance(obj, memoryview):
        assert key == "data" and obj.readonly
        return obj.tobytes()
    if isinstance(obj, dict):
        return {k: plain(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


msgpack_documents = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.integers(0, 200).map(lambda n: bytes(range(256)) * n),  # up to bin 16 sizes
    lambda inner: (
        st.lists(inner, max_size=20)
        | st.dictionaries(st.sampled_from(["data", "dtype", "x"]) | st.text(max_size=8), inner)
    ),
    max_leaves=40,
)


@PROPERTY
@given(doc=msgpack_documents)
def test_viewing_decoder_reads_any_msgpack_like_msgpack(doc: Any) -> None:
    frame = pack({"data": bytes(1 << 20), "doc": doc})
    viewed = unpackb(frame)
    assert isinstance(viewed["data"], memoryview)
    assert plain(viewed) == msgpack.unpackb(frame, raw=False)


BIG_FRAME = encode(
    "activations", round=3, x=np.ones(BIG, np.float32), y=np.arange(32), compute_s=0.5
)


def outcome(frame: bytes | bytearray) -> Any:
    try:
        msg = decode(frame)
    except ProtocolError as exc:
        return ("refused", exc.code, exc.reason)
    arrays = {
        k: (v.dtype.str, v.shape, v.tobytes()) for k, v in msg.fields.items() if k in ("x", "y")
    }
    return (msg.type, dict(msg.fields, **arrays))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_mutated_large_frames_decode_alike_viewed_or_copied(data: st.DataObject) -> None:
    frame = bytearray(BIG_FRAME)
    # Every header of this frame sits in its first 100 or last 400 bytes.
    where = st.one_of(st.integers(0, 100), st.integers(len(frame) - 400, len(frame) - 1))
    for _ in range(data.draw(st.integers(1, 3))):
        frame[data.draw(where)] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        frame = frame[: data.draw(where)]
    # bytes are viewed, a bytearray is copied: both must come to the same message or error.
    assert outcome(bytes(frame)) == outcome(frame)
