"""Tests for edge_agent.protocol: tensor and message round trips, every rejection and its close code."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent import protocol
from edge_agent.protocol import (
    AGENT_TYPES,
    DTYPES,
    ORCHESTRATOR_TYPES,
    SCHEMAS,
    Message,
    ProtocolError,
    decode,
    encode,
    tensor_to_wire,
)

ROOT = Path(__file__).resolve().parents[2]

# Property tests stay small: the whole file must run in a few seconds on two cores.
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(max_examples=300, deadline=None)


# --- helpers -------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def raw(msg_type: str, **fields: Any) -> dict[str, Any]:
    """A valid frame as a plain msgpack map, ready to be broken on purpose."""
    return msgpack.unpackb(encode(msg_type, **fields), raw=False)


def close_code(frame: Any, allowed: frozenset[str] | None = None) -> int:
    with pytest.raises(ProtocolError) as info:
        decode(frame, allowed)
    exc = info.value
    assert isinstance(exc.reason, str) and exc.reason
    assert str(exc) == exc.reason
    return exc.code


def little_endian_bytes(a: np.ndarray) -> bytes:
    """The bytes the wire should carry for ``a``: C order, little-endian."""
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()


def assert_same_tensor(decoded: np.ndarray, original: np.ndarray) -> None:
    assert isinstance(decoded, np.ndarray)
    assert decoded.dtype.name == original.dtype.name
    assert decoded.dtype.isnative
    assert decoded.shape == original.shape
    assert np.array_equal(decoded, original, equal_nan=original.dtype.kind == "f")
    # Bit for bit as well: NaN payloads and signed zeros survive, nothing is converted.
    assert little_endian_bytes(decoded) == little_endian_bytes(original)


def assert_same_value(decoded: Any, original: Any) -> None:
    if isinstance(original, np.ndarray):
        assert_same_tensor(decoded, original)
    elif (
        isinstance(original, dict)
        and original
        and isinstance(next(iter(original.values())), np.ndarray)
    ):
        assert list(decoded) == list(original)
        for k in original:
            assert_same_tensor(decoded[k], original[k])
    else:
        assert decoded == original


def decode_every_way(frame: bytes, allowed: frozenset[str] | None = None) -> Message:
    """Decode ``frame`` as bytes, as a read-only view and as a mutable buffer; all must agree.

    The frame must also be plain msgpack: re-packing what msgpack reads gives the same bytes.
    """
    assert msgpack.packb(msgpack.unpackb(frame, raw=False), use_bin_type=True) == frame
    msg = decode(frame, allowed)
    views = decode(memoryview(frame), allowed)
    buf = bytearray(frame)
    copied = decode(buf, allowed)
    buf[:] = bytes(len(buf))  # tensors decoded from a mutable buffer must not alias it
    for other in (views, copied):
        assert other.type == msg.type and list(other.fields) == list(msg.fields)
        for name, value in msg.fields.items():
            assert_same_value(other[name], value)
    return msg


def gradients_frame(**grad: Any) -> bytes:
    """A gradients frame whose tensor map is replaced by ``grad``."""
    obj = raw("gradients", round=1, grad=np.zeros((2, 3), np.float32), loss=0.5)
    obj["grad"] = grad
    return pack(obj)


# --- strategies ----------------------------------------------------------------------------


@st.composite
def wire_arrays(draw: st.DrawFn, max_dims: int = 4) -> np.ndarray:
    """Arrays of every wire dtype, in either byte order and in contiguous or strided layout."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=1, max_side=5))
    a = draw(hnp.arrays(dtype, shape))
    if dtype.itemsize > 1 and draw(st.booleans()):
        a = a.astype(dtype.newbyteorder(">"))
    layout = draw(st.sampled_from(("contiguous", "transposed", "strided")))
    if layout == "transposed":
        a = a.T
    elif layout == "strided":
        # Every other row of a twice-as-tall buffer: a view the encoder must copy.
        tall = np.zeros((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
        tall[::2] = a
        a = tall[::2]
    return a


# --- round trips ---------------------------------------------------------------------------


@PROPERTY
@given(
    x=wire_arrays(),
    y=wire_arrays(max_dims=2),
    round_=st.integers(0, 2**31),
    compute_s=st.floats(0, 1e6, allow_nan=False),
)
def test_activations_round_trip(
    x: np.ndarray, y: np.ndarray, round_: int, compute_s: float
) -> None:
    frame = encode("activations", round=round_, x=x, y=y, compute_s=compute_s)
    msg = decode_every_way(frame, AGENT_TYPES)
    assert msg.type == "activations"
    assert msg["round"] == round_
    assert msg["compute_s"] == compute_s
    assert_same_tensor(msg["x"], x)
    assert_same_tensor(msg["y"], y)


@PROPERTY
@given(
    weights=st.dictionaries(st.text(min_size=1, max_size=24), wire_arrays(), max_size=4),
    round_=st.integers(0, 10**6),
)
def test_eval_result_round_trip(weights: dict[str, np.ndarray], round_: int) -> None:
    frame = encode("eval_result", round=round_, weights=weights, compute_s=0.25)
    msg = decode_every_way(frame, AGENT_TYPES)
    assert list(msg["weights"]) == list(weights)  # state_dict order survives the trip
    for name, array in weights.items():
        assert_same_tensor(msg["weights"][name], array)


def test_big_endian_input_travels_little_endian() -> None:
    a = np.array([[1, 2], [3, 258]], dtype=">i4")
    wire = msgpack.unpackb(encode("gradients", round=1, grad=a, loss=0.0), raw=False)["grad"]
    assert wire == {
        "dtype": "int32",
        "shape": [2, 2],
        "data": np.array([1, 2, 3, 258], "<i4").tobytes(),
    }


def test_non_contiguous_input_travels_in_c_order() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2].T
    wire = tensor_to_wire(a)
    assert wire["shape"] == [2, 3]
    assert bytes(wire["data"]) == np.ascontiguousarray(a).astype("<f4").tobytes()


def test_contiguous_little_endian_input_is_not_copied() -> None:
    a = np.arange(6, dtype="<f8")
    data = tensor_to_wire(a)["data"]
    a[0] = 42.0
    assert np.frombuffer(data, "<f8")[0] == 42.0


@pytest.mark.parametrize("size", [3, 4096])  # small and large payloads take different paths
def test_decoded_tensors_do_not_alias_a_mutable_frame(size: int) -> None:
    frame = bytearray(encode("gradients", round=1, grad=np.ones(size, np.float32), loss=0.0))
    grad = decode(frame)["grad"]
    frame[:] = bytes(len(frame))
    assert np.array_equal(grad, np.ones(size, np.float32))


@pytest.mark.skipif(sys.byteorder != "little", reason="on big-endian hosts decode must copy")
@pytest.mark.parametrize("size", [3, 4096])
def test_decoded_tensors_are_read_only(size: int) -> None:
    msg = decode(encode("gradients", round=1, grad=np.ones(size, np.float32), loss=0.0))
    assert not msg["grad"].flags.writeable


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 0, 4), (0, 0, 0, 0)])
def test_decode_accepts_scalar_and_empty_tensors(shape: tuple[int, ...]) -> None:
    for name in DTYPES:
        itemsize = np.dtype(name).itemsize
        data = b"\x01" * (itemsize * math.prod(shape))
        grad = {"dtype": name, "shape": list(shape), "data": data}
        decoded = decode(gradients_frame(**grad))["grad"]
        assert decoded.dtype.name == name
        assert decoded.shape == shape


def test_zero_dim_tensor_keeps_its_shape() -> None:
    for name in DTYPES:
        a = np.array(1, dtype=name)
        assert decode(encode("gradients", round=1, grad=a, loss=0.0))["grad"].shape == ()


@pytest.mark.parametrize(
    "shape",
    [
        (0,),
        (3, 0),
        (0, 5),
        (2, 0, 4),
        (0, 0, 0, 0),
    ],
)
def test_empty_tensor_round_trip(shape: tuple[int, ...]) -> None:
    for name in DTYPES:
        a = np.zeros(shape, dtype=name)
        assert_same_tensor(decode(encode("gradients", round=1, grad=a, loss=0.0))["grad"], a)


# --- every message type --------------------------------------------------------------------

WEIGHTS = {
    "conv.weight": np.linspace(-1, 1, 2 * 1 * 3 * 3, dtype=np.float32).reshape(2, 1, 3, 3),
    "conv.bias": np.zeros(2, np.float32),
    "norm.num_groups": np.array([1], np.int64),
}
SAMPLES: dict[str, dict[str, Any]] = {
    "hello": {
        "protocol": protocol.PROTOCOL_VERSION,
        "device_id": "pi-03",
        "token": "s3cret",
        "facts": {"hostname": "pi-03", "cpu_count": 4, "memory_bytes": 4 << 30, "torch_device": ""},
        "resume": {"run_id": "20250101-120000-ab12", "round": 17},
    },
    "job": {
        "run_id": "20250101-120000-ab12",
        "job": {
            "model": "digits_cnn",
            "cut": "conv1",
            "dataset": "digits",
            "num_classes": 10,
            "dataset_fingerprint": "0123456789abcdef",
            "algorithm": "psl",
            "rounds": 100,
            "batch_size": 32,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "seed": 0,
            "rank": 2,
            "gapsl_space": "client",
            "gda_mode": "first_order",
        },
        "shard": np.array([0, 5, 9, 1200], np.int64),
        "weights": WEIGHTS,
    },
    "ready": {"shard_size": 4, "load_s": 0.8, "torch_device": "cpu", "restored_round": 20},
    "round": {"round": 1, "batch_size": 32},
    "activations": {
        "round": 1,
        "x": np.full((4, 2, 4, 4), 0.5, np.float32),
        "y": np.array([3, 1, 4, 1], np.int64),
        "compute_s": 0.012,
    },
    "gradients": {
        "round": 1,
        "grad": np.full((4, 2, 4, 4), -0.01, np.float32),
        "loss": 2.3,
        "hold": True,
    },
    "client_grad": {
        "round": 1,
        "grad": np.linspace(-1, 1, 200, dtype=np.float32),
        "compute_s": 0.004,
    },
    "align": {
        "round": 1,
        "leader": np.linspace(1, -1, 200, dtype=np.float32),
        "mode": "first_order",
        "lam": 1.0,
    },
    "set_weights": {"round": 5, "weights": WEIGHTS},
    "echo": {"seq": 3, "payload": np.zeros(16, np.uint8), "reply_bytes": 1024},
    "echo_reply": {"seq": 3, "payload": np.zeros(1024, np.uint8)},
    "bench": {"seq": 4, "batch_size": 64, "repeats": 5},
    "bench_result": {"seq": 4, "fwd_s": 0.012, "bwd_s": 0.025},
    "skip": {"round": 9},
    "missed": {"round": 9},
    "eval_request": {"round": 10, "checkpoint": True},
    "eval_result": {"round": 10, "weights": WEIGHTS, "compute_s": 0.003},
    "telemetry": {"stats": {"cpu_percent": 37.5, "mem_percent": 61.0, "rss_bytes": 123456789}},
    "error": {"code": "job_failed", "message": "the local copy of digits differs"},
    "bye": {"reason": "interrupted; the run can be resumed", "redial": True},
}


def test_samples_cover_every_type() -> None:
    # A new message type needs a sample here, so that it is round-tripped and fuzzed too.
    assert set(SAMPLES) == set(SCHEMAS)


def test_every_type_has_a_receiver() -> None:
    # A type in SCHEMAS that neither side accepts would be refused with 1002 wherever it is sent.
    assert set(SCHEMAS) - (AGENT_TYPES | ORCHESTRATOR_TYPES) == set()
    assert (AGENT_TYPES | ORCHESTRATOR_TYPES) - set(SCHEMAS) == set()
    assert AGENT_TYPES & ORCHESTRATOR_TYPES == {"error", "bye"}


@pytest.mark.parametrize("msg_type", sorted(SCHEMAS))
def test_every_message_type_round_trips(msg_type: str) -> None:
    fields = SAMPLES[msg_type]
    msg = decode_every_way(encode(msg_type, **fields))
    assert isinstance(msg, Message)
    assert msg.type == msg_type
    assert set(msg.fields) == set(fields)
    for name, value in fields.items():
        assert_same_value(msg[name], value)
        assert_same_value(msg.get(name), value)


def test_optional_field_may_be_left_out_or_none() -> None:
    fields = dict(SAMPLES["hello"], resume=None)
    assert "resume" not in raw("hello", **fields)
    msg = decode(encode("hello", **fields), AGENT_TYPES)
    assert msg.get("resume") is None
    assert "resume" not in msg.fields


def test_numpy_scalars_travel_as_plain_numbers() -> None:
    msg = decode(
        encode("ready", shard_size=np.int64(7), load_s=np.float32(0.5), torch_device="cpu")
    )
    assert msg["shard_size"] == 7 and type(msg["shard_size"]) is int
    assert msg["load_s"] == 0.5


@pytest.mark.parametrize(
    ("msg_type", "fields", "match"),
    [
        ("nonsense", {}, "unknown message type"),
        ("bye", {"reason": "x", "note": "y"}, "unknown field"),
        ("bye", {}, "missing field"),
        (
            "gradients",
            {"round": 1, "grad": np.zeros(2, np.complex64), "loss": 0.0},
            "cannot travel",
        ),
    ],
)
def test_encode_refuses_what_the_schema_forbids(
    msg_type: str, fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        encode(msg_type, **fields)


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


# --- layering ------------------------------------------------------------------------------


def test_protocol_imports_no_asyncio_websockets_or_torch() -> None:
    code = (
        "import sys, edge_agent.protocol; "
        "print(','.join(m for m in ('asyncio', 'websockets', 'torch') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "", (
        f"importing edge_agent.protocol pulled in: {out.stdout.strip()}"
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
    viewed = protocol._unpackb(frame)
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
