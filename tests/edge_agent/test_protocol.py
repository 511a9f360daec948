"""Tests for edge_agent.protocol: tensor and message round trips, and the module's layering."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol import (
    AGENT_TYPES,
    DTYPES,
    ORCHESTRATOR_TYPES,
    SCHEMAS,
    Message,
    decode,
    encode,
    tensor_to_wire,
)

from .protocol_helpers import (
    PROPERTY,
    SAMPLES,
    assert_same_tensor,
    assert_same_value,
    decode_every_way,
    gradients_frame,
    heavy_imports_of,
    raw,
    wire_arrays,
)

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_client_grad_without_aligned_still_decodes() -> None:
    """An agent from before the field, or one that has aligned no round yet, leaves it out."""
    fields = dict(SAMPLES["client_grad"], aligned=None)
    msg = decode(encode("client_grad", **fields), AGENT_TYPES)
    assert "aligned" not in msg.fields and msg.get("aligned") is None


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


# --- layering ------------------------------------------------------------------------------


def test_protocol_imports_no_asyncio_websockets_or_torch() -> None:
    pulled = heavy_imports_of("edge_agent.protocol")
    assert pulled == "", f"importing edge_agent.protocol pulled in: {pulled}"
