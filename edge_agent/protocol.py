"""Wire protocol v1: bytes in, messages out. Pure: no asyncio, no websockets, no torch.

Every WebSocket frame is binary and holds one msgpack map with a ``type`` key. Tensors travel as
``{"dtype": str, "shape": [int, ...], "data": bin}`` with little-endian raw bytes, never pickle.
Each message type has a schema (below); :func:`decode` checks a frame against it and raises
:class:`ProtocolError` carrying the WebSocket close code the peer should be closed with.
``docs/protocol.md`` documents every message and field.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import ProtocolError
from .scanner import packb, unpackb

__all__ = [
    "AGENT_TYPES",
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_PAYLOAD",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_UNSUPPORTED_DATA",
    "DTYPES",
    "FIELD_KINDS",
    "MAX_TENSOR_DIMS",
    "ORCHESTRATOR_TYPES",
    "PROTOCOL_VERSION",
    "SCHEMAS",
    "Message",
    "ProtocolError",
    "decode",
    "encode",
    "tensor_to_wire",
]

PROTOCOL_VERSION = 1

# WebSocket close codes (RFC 6455 section 7.4.1) as this protocol uses them.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002  # a well-formed message that breaks the protocol (type, state, version)
CLOSE_UNSUPPORTED_DATA = 1003  # a text frame where binary is required
CLOSE_INVALID_PAYLOAD = 1007  # undecodable msgpack, missing/mistyped fields, bad tensors
CLOSE_POLICY_VIOLATION = 1008  # unknown device or wrong token
CLOSE_MESSAGE_TOO_BIG = 1009  # enforced by the websockets library through max_size

# Dtypes allowed on the wire; all little-endian.
DTYPES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)
_WIRE_DTYPE = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}
_WIRE_NAME = {d: name for name, dt in _WIRE_DTYPE.items() for d in (dt, dt.newbyteorder(">"))}
MAX_TENSOR_DIMS = 8
_TENSOR_KEYS = frozenset({"dtype", "shape", "data"})


@dataclass(frozen=True)
class Message:
    """One decoded message: its ``type`` and its fields (tensors as read-only numpy arrays)."""

    type: str
    fields: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


# --- field kinds ---------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return (isinstance(v, float) or _is_int(v)) and math.isfinite(v)


# What a field of each kind may hold once msgpack has read it (tensors are checked further on).
# The job spec (edge_agent.jobspec) checks its keys with the same predicates.
FIELD_KINDS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "float": _is_float,
    "bool": lambda v: isinstance(v, bool),
    "map": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
    "tensor": lambda v: True,  # checked by _decode_tensor
    "tensors": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
    # a round and a cosine: {"round": int, "cos": finite float in [-1, 1]}
    "aligned": lambda v: (
        isinstance(v, dict)
        and v.keys() == {"round", "cos"}
        and _is_int(v["round"])
        and _is_float(v["cos"])
        and -1.0 <= v["cos"] <= 1.0
    ),
}

# type -> {field: (kind, required)}; direction "a" = agent to orchestrator, "o" = the other way.
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    "hello": {
        "protocol": ("int", True),
        "device_id": ("str", True),
        "token": ("str", True),
        "facts": ("map", True),
        "resume": ("map", False),
    },
    "job": {
        "run_id": ("str", True),
        "job": ("map", True),
        "shard": ("tensor", True),
        "weights": ("tensors", True),
    },
    "ready": {
        "shard_size": ("int", True),
        "load_s": ("float", True),
        "torch_device": ("str", True),
        "restored_round": ("int", False),  # the round of the local checkpoint it resumed from
    },
    "round": {"round": ("int", True), "batch_size": ("int", True)},
    "activations": {
        "round": ("int", True),
        "x": ("tensor", True),  # float32, or as training.compression packs it (float16, int8)
        "x_scale": ("float", False),  # int8 only: x = data * x_scale (edge_agent.compress)
        "y": ("tensor", True),
        "compute_s": ("float", True),
        "backward_s": ("float", False),  # the previous round's backward, for the profiler
    },
    "gradients": {
        "round": ("int", True),
        "grad": ("tensor", True),  # packed like the round's activations
        "grad_scale": ("float", False),  # int8 only, as x_scale
        "loss": ("float", True),
        "hold": ("bool", False),  # true: do not step yet; upload client_grad, wait for align
    },
    "client_grad": {
        "round": ("int", True),
        "grad": ("tensor", True),
        "compute_s": ("float", True),
        # cos(g', g_L) of the last round this device aligned (its GDA step), absent before one
        "aligned": ("aligned", False),
    },
    "align": {
        "round": ("int", True),
        "leader": ("tensor", True),
        "mode": ("str", True),
        "lam": ("float", True),
    },
    "set_weights": {"round": ("int", True), "weights": ("tensors", True)},
    # checkpoint: also save a local checkpoint of this round before answering
    "eval_request": {"round": ("int", True), "checkpoint": ("bool", False)},
    "eval_result": {
        "round": ("int", True),
        "weights": ("tensors", True),
        "compute_s": ("float", True),
    },
    "echo": {"seq": ("int", True), "payload": ("tensor", True), "reply_bytes": ("int", False)},
    "echo_reply": {"seq": ("int", True), "payload": ("tensor", True)},
    "bench": {"seq": ("int", True), "batch_size": ("int", True), "repeats": ("int", True)},
    "bench_result": {"seq": ("int", True), "fwd_s": ("float", True), "bwd_s": ("float", True)},
    "skip": {"round": ("int", True)},
    # a device that restarted cannot answer a request of this round (its forward pass is gone)
    "missed": {"round": ("int", True)},
    "telemetry": {"stats": ("map", True)},
    "error": {"code": ("str", True), "message": ("str", True)},
    # redial: the run was interrupted and may be resumed; keep state and dial again
    "bye": {"reason": ("str", True), "redial": ("bool", False)},
}
AGENT_TYPES = frozenset(
    {
        "hello",
        "ready",
        "activations",
        "client_grad",
        "eval_result",
        "echo_reply",
        "bench_result",
        "missed",
        "telemetry",
        "error",
        "bye",
    }
)
ORCHESTRATOR_TYPES = frozenset(
    {
        "job",
        "round",
        "gradients",
        "align",
        "set_weights",
        "eval_request",
        "echo",
        "bench",
        "skip",
        "error",
        "bye",
    }
)


# --- tensors -------------------------------------------------------------------------------


def tensor_to_wire(array: np.ndarray) -> dict[str, Any]:
    """The wire form of an array; no copy when it is already C-contiguous little-endian."""
    arr = np.asarray(array)
    name = _WIRE_NAME.get(arr.dtype) or arr.dtype.name  # dtype.name alone costs microseconds
    if name not in _WIRE_DTYPE:
        raise ValueError(
            f"dtype {arr.dtype} cannot travel on the wire (allowed: {', '.join(DTYPES)})"
        )
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
        arr = arr.astype(_WIRE_DTYPE[name])
    shape = list(arr.shape)  # before ascontiguousarray, which turns a 0-d array into shape [1]
    arr = np.ascontiguousarray(arr)
    if arr.size == 0:  # memoryview.cast refuses a zero in a multi-dimensional shape
        return {"dtype": name, "shape": shape, "data": b""}
    # memoryview over the array's own buffer: msgpack writes it once into the frame.
    return {"dtype": name, "shape": shape, "data": memoryview(arr.reshape(-1)).cast("B")}  # type: ignore[arg-type]


def _decode_tensor(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, dict) or value.keys() != _TENSOR_KEYS:
        raise ProtocolError(
            CLOSE_INVALID_PAYLOAD, f"{where}: expected a tensor map {{dtype, shape, data}}"
        )
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if not isinstance(dtype, str) or dtype not in _WIRE_DTYPE:
        raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"{where}: unsupported dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or any(type(d) is not int or d < 0 for d in shape)  # msgpack ints are exact ints
    ):
        raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"{where}: bad shape {shape!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"{where}: data is not binary")
    wire = _WIRE_DTYPE[dtype]
    count = math.prod(shape)
    if count * wire.itemsize != len(data):
        raise ProtocolError(
            CLOSE_INVALID_PAYLOAD,
            f"{where}: {len(data)} bytes do not hold shape {shape} of {dtype}",
        )
    try:
        arr = np.frombuffer(data, wire, count).reshape(shape)
    except ValueError as exc:  # an empty shape whose other dims overflow numpy's index type
        raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"{where}: shape {shape} too large") from exc
    if sys.byteorder == "big":
        arr = arr.astype(wire.newbyteorder("="))
    return arr


# --- messages ------------------------------------------------------------------------------


def _to_wire(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return tensor_to_wire(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def encode(msg_type: str, **fields: Any) -> bytes:
    """One frame for a message; numpy arrays become wire tensors, dicts of arrays likewise.

    Checked against the schema, so a sender's bug surfaces here instead of at the peer.
    """
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ValueError(f"unknown message type {msg_type!r}")
    payload: dict[str, Any] = {"type": msg_type}
    for name, value in fields.items():
        if name not in schema:
            raise ValueError(f"{msg_type}: unknown field {name!r}")
        if value is None and not schema[name][1]:
            continue
        kind = schema[name][0]
        if kind == "tensors":
            payload[name] = {k: tensor_to_wire(v) for k, v in value.items()}
        else:
            payload[name] = _to_wire(value)
    missing = [n for n, (_, required) in schema.items() if required and n not in payload]
    if missing:
        raise ValueError(f"{msg_type}: missing field(s) {', '.join(missing)}")
    return packb(payload)


def decode(
    frame: bytes | bytearray | memoryview | str, allowed: frozenset[str] | None = None
) -> Message:
    """Decode and validate one frame; ``allowed`` restricts the types this side may receive.

    Raises :class:`ProtocolError` with the close code to use: 1003 for a text frame, 1007 for an
    undecodable frame or a malformed field, 1002 for a type this side must not receive.
    """
    if isinstance(frame, str):
        raise ProtocolError(CLOSE_UNSUPPORTED_DATA, "text frames are not part of the protocol")
    try:
        obj = unpackb(frame)
    except Exception as exc:  # msgpack raises a zoo of types for corrupt input
        raise ProtocolError(
            CLOSE_INVALID_PAYLOAD, f"undecodable frame: {type(exc).__name__}"
        ) from exc
    if not isinstance(obj, dict):
        raise ProtocolError(CLOSE_INVALID_PAYLOAD, "a frame must hold one msgpack map")
    msg_type = obj.pop("type", None)
    if not isinstance(msg_type, str):
        raise ProtocolError(CLOSE_INVALID_PAYLOAD, "frame has no string 'type'")
    schema = SCHEMAS.get(msg_type)
    if schema is None:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown message type {msg_type[:40]!r}")
    if allowed is not None and msg_type not in allowed:
        raise ProtocolError(
            CLOSE_PROTOCOL_ERROR, f"message {msg_type!r} is not expected from this peer"
        )
    fields: dict[str, Any] = {}
    for name, value in obj.items():
        if name not in schema:
            raise ProtocolError(
                CLOSE_INVALID_PAYLOAD, f"{msg_type}: unknown field {str(name)[:40]!r}"
            )
        kind = schema[name][0]
        where = f"{msg_type}.{name}"
        if not FIELD_KINDS[kind](value):
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"{where}: expected {kind}")
        if kind == "tensor":
            value = _decode_tensor(value, where)
        elif kind == "tensors":
            value = {k: _decode_tensor(v, f"{where}.{k}") for k, v in value.items()}
        fields[name] = value
    missing = [n for n, (_, required) in schema.items() if required and n not in fields]
    if missing:
        raise ProtocolError(
            CLOSE_INVALID_PAYLOAD, f"{msg_type}: missing field(s) {', '.join(missing)}"
        )
    return Message(msg_type, fields)
