"""Shared pieces of the wire-protocol tests: frame helpers, tensor strategies, and one valid
sample of every message type (so that each is round-tripped and fuzzed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent import protocol
from edge_agent.protocol import DTYPES, Message, ProtocolError, decode, encode

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


# --- one sample of every message type ----------------------------------------------------

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
        "aligned": {"round": 0, "cos": 0.81},
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

# A whole job map, as the orchestrator sends one for a digits PSL run (job_spec in
# orchestrator.training.job): the job spec and agent tests break it one key at a time.
JOB_MAP: dict[str, Any] = {
    "model": "digits_cnn",
    "cut": "default",
    "dataset": "digits",
    "num_classes": 10,
    "dataset_fingerprint": "0123456789abcdef",
    "algorithm": "psl",
    "rounds": 100,
    "batch_size": 32,
    "lr": 0.05,
    "lr_decay": "none",
    "client_anchor": 0.0,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "seed": 0,
    "rank": 2,
    "gapsl_space": "",
    "gda_mode": "",
    "gapsl_leader": "gradient",
    "track_beta": 0.0,
    "compression": "none",
}


def heavy_imports_of(*modules: str) -> str:
    """Which of asyncio, websockets and torch importing ``modules`` pulls in, in a fresh
    interpreter (comma-separated; empty when none)."""
    code = (
        f"import sys, {', '.join(modules)}; "
        "print(','.join(m for m in ('asyncio', 'websockets', 'torch') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()
