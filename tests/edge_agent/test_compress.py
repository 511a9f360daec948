"""The cut-layer codecs: error bounds, edge values, refusals, and the trip through real frames."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent import compress
from edge_agent.compress import CompressionError, check_mode, pack, roundtrip, unpack, wire_dtype
from edge_agent.protocol import AGENT_TYPES, ORCHESTRATOR_TYPES, ProtocolError, decode, encode

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Activation-like tensors: finite float32 of any magnitude float16 can hold, any shape. No
# subnormals: a tensor of nothing but them has a scale that underflows, and int8 then sends zeros
# by design (test_int8_of_zeros_and_of_a_constant), which no half-step bound describes.
activations = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9),
    elements=st.floats(
        -6e4, 6e4, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False
    ),
)


@PROPERTY
@given(x=activations, mode=st.sampled_from(compress.MODES))
def test_round_trip_keeps_shape_and_gives_float32(x: np.ndarray, mode: str) -> None:
    data, scale = pack(x, mode)
    assert data.dtype == wire_dtype(mode) and data.shape == x.shape
    assert (scale is not None) == (mode == "int8")
    y = unpack(data, scale, mode)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_array_equal(roundtrip(x, mode), y)  # the in-process path is the wire's


@PROPERTY
@given(x=activations)
def test_fp16_is_the_nearest_half(x: np.ndarray) -> None:
    np.testing.assert_array_equal(roundtrip(x, "fp16"), x.astype(np.float16).astype(np.float32))


@PROPERTY
@given(x=activations)
def test_int8_error_is_at_most_half_a_step(x: np.ndarray) -> None:
    q, scale = pack(x, "int8")
    assert scale is not None and scale >= 0
    assert q.size == 0 or int(np.abs(q.astype(np.int16)).max()) <= 127
    err = np.abs(unpack(q, scale).astype(np.float64) - x)
    # half a quantisation step, plus float32 rounding of x / scale and of q * scale
    bound = scale / 2 + 1e-6 * (np.abs(x.astype(np.float64)) + scale)
    assert (err <= bound).all()
    if x.size and scale > 0:
        assert int(np.abs(q.astype(np.int16)).max()) == 127  # the peak uses the full range


def test_none_is_the_array_itself() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    data, scale = pack(x, "none")
    assert data is x and scale is None
    assert unpack(x) is x and roundtrip(x, "none") is x
    nan = np.array([[np.nan]], np.float32)
    assert roundtrip(nan, "none") is nan  # finiteness stays the receiver's check, as before


def test_int8_of_zeros_and_of_a_constant() -> None:
    q, scale = pack(np.zeros((3, 4), np.float32), "int8")
    assert scale == 0.0 and q.dtype == np.int8 and not q.any()
    assert not unpack(q, scale).any()
    x = np.full((2, 5), -2.5, np.float32)
    np.testing.assert_array_equal(roundtrip(x, "int8"), x)  # the peak is exact
    tiny = np.full((2, 2), 1e-45, np.float32)  # the scale underflows: zeros, not a division by 0
    q, scale = pack(tiny, "int8")
    assert scale == 0.0 and not q.any()


@pytest.mark.parametrize("mode", ["fp16", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(mode: str, bad: float) -> None:
    x = np.ones((2, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(CompressionError, match="non-finite"):
        pack(x, mode)


def test_fp16_overflow_is_refused_at_the_rounding_boundary() -> None:
    below = np.array([[65519.996]], np.float32)  # rounds down to float16's 65504
    assert roundtrip(below, "fp16")[0, 0] == 65504.0
    for v in (65520.0, -65520.0, 1e6):
        with pytest.raises(CompressionError, match="float16"):
            pack(np.array([[v]], np.float32), "fp16")


def test_unpack_refuses_forms_no_codec_writes() -> None:
    f32 = np.zeros((2, 2), np.float32)
    i8 = np.zeros((2, 2), np.int8)
    with pytest.raises(CompressionError, match="only with int8"):
        unpack(f32, 1.0)
    with pytest.raises(CompressionError, match="needs its scale"):
        unpack(i8)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(CompressionError, match="scale"):
            unpack(i8, bad)
    with pytest.raises(CompressionError, match="wire dtype"):
        unpack(np.zeros(3, np.int32))
    with pytest.raises(CompressionError, match="training.compression = 'int8'"):
        unpack(f32, None, "int8")
    with pytest.raises(CompressionError, match="training.compression = 'none'"):
        unpack(np.zeros((2, 2), np.float16), None, "none")


def test_unknown_mode_names_the_choices() -> None:
    assert check_mode("fp16") == "fp16"
    with pytest.raises(ValueError, match="none, fp16, int8"):
        check_mode("bf16")
    with pytest.raises(ValueError):
        pack(np.zeros(2, np.float32), "zstd")


@pytest.mark.parametrize("mode", compress.MODES)
def test_frames_carry_exactly_what_roundtrip_gives(mode: str) -> None:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((32, 16, 7, 7)) * 3).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int64)
    data, scale = pack(x, mode)
    frame = encode("activations", round=3, x=data, x_scale=scale, y=y, compute_s=0.1)
    msg = decode(frame, AGENT_TYPES)
    assert msg["x"].dtype == wire_dtype(mode)
    assert ("x_scale" in msg.fields) == (mode == "int8")
    np.testing.assert_array_equal(unpack(msg["x"], msg.get("x_scale"), mode), roundtrip(x, mode))
    # gradients come down the same way
    grad, gscale = pack(x / 7, mode)
    frame = encode("gradients", round=3, grad=grad, grad_scale=gscale, loss=0.5)
    msg = decode(frame, ORCHESTRATOR_TYPES)
    np.testing.assert_array_equal(
        unpack(msg["grad"], msg.get("grad_scale"), mode), roundtrip(x / 7, mode)
    )
    # the payload shrinks by the element size: 4, 2 or 1 bytes
    assert len(frame) < x.size * wire_dtype(mode).itemsize + 200


def test_a_non_finite_scale_does_not_decode() -> None:
    import msgpack

    frame = encode(
        "activations", round=1, x=np.zeros((2, 2), np.int8), x_scale=1.0, y=np.zeros(2, np.int64),
        compute_s=0.0,
    )  # fmt: skip
    doc = msgpack.unpackb(frame, raw=False)
    doc["x_scale"] = float("nan")
    with pytest.raises(ProtocolError, match="x_scale") as err:
        decode(msgpack.packb(doc, use_bin_type=True), AGENT_TYPES)
    assert err.value.code == 1007
