"""Tests for edge_agent.protocol: every rejection and its close code, and fuzzed frames."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent import protocol
from edge_agent.protocol import (
    AGENT_TYPES,
    ORCHESTRATOR_TYPES,
    SCHEMAS,
    Message,
    ProtocolError,
    decode,
    encode,
)

from .protocol_helpers import FUZZ, SAMPLES, close_code, gradients_frame, pack, raw

# --- rejections and their close codes ------------------------------------------------------

GOOD_GRAD = {"dtype": "float32", "shape": [2, 3], "data": b"\x00" * 24}
BAD_WEIGHTS = pack(
    {
        "type": "eval_result",
        "round": 1,
        "weights": {"w": {"dtype": "float32", "shape": [1], "data": b""}},
        "compute_s": 0.0,
    }
)


def _without(obj: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != key}


INVALID_1007: list[tuple[str, bytes]] = [
    ("empty frame", b""),
    ("garbage bytes", b"\xc1\xff\x00garbage"),
    ("truncated frame", encode("round", round=1, batch_size=32)[:-3]),
    ("trailing bytes", encode("bye", reason="done") + b"\x00"),
    ("msgpack list", pack(["bye", "done"])),
    ("msgpack string", pack("bye")),
    ("msgpack int", pack(7)),
    ("msgpack nil", pack(None)),
    ("missing type", pack({"reason": "done"})),
    ("non-string type", pack({"type": 3, "reason": "done"})),
    ("non-string map key", b"\x82\xa4type\xa3bye\x01\xa1x"),
    ("ext value", pack({"type": "bye", "reason": msgpack.ExtType(1, b"pickle")})),
    ("missing required field", pack(_without(raw("gradients", **SAMPLES["gradients"]), "grad"))),
    ("missing required field (bye)", pack({"type": "bye"})),
    ("unknown field", pack({"type": "bye", "reason": "done", "note": "extra"})),
    ("str where int", pack({"type": "round", "round": "1", "batch_size": 32})),
    ("float where int", pack({"type": "round", "round": 1, "batch_size": 32.0})),
    ("bool where int", pack(dict(raw("hello", **SAMPLES["hello"]), protocol=True))),
    ("int where str", pack({"type": "bye", "reason": 0})),
    ("list where map", pack({"type": "telemetry", "stats": [1, 2]})),
    (
        "str where float",
        pack({"type": "ready", "shard_size": 1, "load_s": "fast", "torch_device": "cpu"}),
    ),
    (
        "bool where float",
        pack({"type": "ready", "shard_size": 1, "load_s": True, "torch_device": "cpu"}),
    ),
    ("list where tensor", pack({"type": "gradients", "round": 1, "grad": [0.0, 1.0], "loss": 0.0})),
    (
        "list where tensors",
        pack({"type": "eval_result", "round": 1, "weights": [], "compute_s": 0.0}),
    ),
    ("NaN float", pack({"type": "gradients", "round": 1, "grad": GOOD_GRAD, "loss": math.nan})),
    ("inf float", pack({"type": "gradients", "round": 1, "grad": GOOD_GRAD, "loss": math.inf})),
    (
        "-inf float",
        pack({"type": "ready", "shard_size": 1, "load_s": -math.inf, "torch_device": "cpu"}),
    ),
    ("data one byte short", gradients_frame(dtype="float32", shape=[2, 3], data=b"\x00" * 23)),
    ("data one byte long", gradients_frame(dtype="float32", shape=[2, 3], data=b"\x00" * 25)),
    ("data for another dtype", gradients_frame(dtype="float64", shape=[2, 3], data=b"\x00" * 24)),
    ("unsupported dtype", gradients_frame(dtype="complex64", shape=[3], data=b"\x00" * 24)),
    ("byte-order prefixed dtype", gradients_frame(dtype="<f4", shape=[6], data=b"\x00" * 24)),
    ("object dtype", gradients_frame(dtype="object", shape=[1], data=b"\x00" * 8)),
    ("negative dim", gradients_frame(dtype="float32", shape=[-2, -3], data=b"\x00" * 24)),
    ("float dim", gradients_frame(dtype="float32", shape=[2.0, 3], data=b"\x00" * 24)),
    ("bool dim", gradients_frame(dtype="uint8", shape=[True], data=b"\x00")),
    ("shape not a list", gradients_frame(dtype="float32", shape=6, data=b"\x00" * 24)),
    ("nine dims", gradients_frame(dtype="uint8", shape=[1] * 9, data=b"\x00")),
    ("data not binary", gradients_frame(dtype="uint8", shape=[3], data="abc")),
    (
        "tensor without data",
        pack({"type": "gradients", "round": 1, "grad": _without(GOOD_GRAD, "data"), "loss": 0.0}),
    ),
    ("tensor with extra key", gradients_frame(order="C", **GOOD_GRAD)),
    *(
        (
            f"client_grad.aligned {name}",
            pack(dict(raw("client_grad", **SAMPLES["client_grad"]), aligned=value)),
        )
        for name, value in [
            ("not a map", [1, 0.5]),
            ("without cos", {"round": 1}),
            ("with an extra key", {"round": 1, "cos": 0.5, "device": "a"}),
            ("float round", {"round": 1.0, "cos": 0.5}),
            ("str cos", {"round": 1, "cos": "0.5"}),
            ("NaN cos", {"round": 1, "cos": math.nan}),
            ("cos beyond 1", {"round": 1, "cos": 1.5}),
            ("nil", None),
        ]
    ),
    ("bad tensor inside tensors", BAD_WEIGHTS),
]


@pytest.mark.parametrize(
    "frame", [f for _, f in INVALID_1007], ids=[name for name, _ in INVALID_1007]
)
def test_malformed_frames_close_with_1007(frame: bytes) -> None:
    assert close_code(frame) == protocol.CLOSE_INVALID_PAYLOAD == 1007


@pytest.mark.parametrize("frame", ["", '{"type": "bye", "reason": "done"}', "\x82\xa4type\xa3bye"])
def test_text_frames_close_with_1003(frame: str) -> None:
    assert close_code(frame) == protocol.CLOSE_UNSUPPORTED_DATA == 1003


def test_unknown_type_closes_with_1002() -> None:
    assert close_code(pack({"type": "shutdown"})) == protocol.CLOSE_PROTOCOL_ERROR == 1002
    assert close_code(pack({"type": "HELLO"}), AGENT_TYPES) == 1002


@pytest.mark.parametrize("msg_type", sorted(SCHEMAS))
def test_types_are_checked_against_the_receiving_side(msg_type: str) -> None:
    frame = encode(msg_type, **SAMPLES[msg_type])
    for receiver in (AGENT_TYPES, ORCHESTRATOR_TYPES):
        if msg_type in receiver:
            assert decode(frame, receiver).type == msg_type
        else:
            assert close_code(frame, receiver) == 1002


def test_direction_is_checked_before_fields() -> None:
    # A job from an agent is out of protocol whatever its fields hold.
    assert close_code(pack({"type": "job", "junk": 1}), AGENT_TYPES) == 1002


@pytest.mark.parametrize("size", [4, 300])  # 300 float32: past the zero-copy threshold
def test_every_prefix_of_a_frame_is_rejected(size: int) -> None:
    frame = encode("gradients", round=3, grad=np.arange(size, dtype=np.float32), loss=1.5)
    for end in range(len(frame)):
        assert close_code(frame[:end]) == 1007


def test_field_errors_name_the_field() -> None:
    with pytest.raises(ProtocolError, match=r"gradients\.grad"):
        decode(gradients_frame(dtype="float32", shape=[2, 3], data=b""))
    with pytest.raises(ProtocolError, match=r"eval_result\.weights\.w"):
        decode(BAD_WEIGHTS)
    with pytest.raises(ProtocolError, match=r"round\.batch_size"):
        decode(pack({"type": "round", "round": 1, "batch_size": "32"}))


@pytest.mark.parametrize("dtype", [["float32"], {"name": "float32"}])
def test_non_string_dtype_closes_with_1007(dtype: Any) -> None:
    assert close_code(gradients_frame(dtype=dtype, shape=[1], data=b"\x00" * 4)) == 1007


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**40, 2**40]])
def test_oversized_empty_shape_closes_with_1007(shape: list[int]) -> None:
    assert close_code(gradients_frame(dtype="float32", shape=shape, data=b"")) == 1007


def test_close_codes_are_the_rfc_6455_values() -> None:
    assert (
        protocol.CLOSE_NORMAL,
        protocol.CLOSE_GOING_AWAY,
        protocol.CLOSE_PROTOCOL_ERROR,
        protocol.CLOSE_UNSUPPORTED_DATA,
        protocol.CLOSE_INVALID_PAYLOAD,
        protocol.CLOSE_POLICY_VIOLATION,
        protocol.CLOSE_MESSAGE_TOO_BIG,
    ) == (1000, 1001, 1002, 1003, 1007, 1008, 1009)


# --- fuzz ----------------------------------------------------------------------------------


def decodes_or_refuses(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError as exc:
        assert exc.code in (1002, 1007)
    else:
        assert isinstance(msg, Message) and msg.type in SCHEMAS


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_protocol_error(frame: bytes) -> None:
    decodes_or_refuses(frame)


FUZZ_SEEDS = [
    encode(t, **SAMPLES[t]) for t in ("hello", "round", "activations", "gradients", "eval_result")
]


@settings(max_examples=200, deadline=None)
@given(seed=st.sampled_from(FUZZ_SEEDS), data=st.data())
def test_mutated_frames_decode_or_raise_protocol_error(seed: bytes, data: st.DataObject) -> None:
    frame = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        # Headers sit near the start and around each payload; aim there as often as anywhere.
        pos = data.draw(st.one_of(st.integers(0, 48), st.integers(0, len(frame) - 1)))
        frame[min(pos, len(frame) - 1)] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        frame = frame[: data.draw(st.integers(0, len(frame)))]
    decodes_or_refuses(bytes(frame))
