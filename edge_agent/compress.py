"""Cut-layer codecs: activations and their gradients as float32, float16, or int8 plus a scale.

``training.compression`` picks one codec for a run. The agent packs the activations it uploads
and unpacks the gradient it gets back; the orchestrator does the reverse. The in-process engine
applies :func:`roundtrip` at the same two places, so ``simulate`` sees exactly the numbers a
distributed run puts on the wire. Pure numpy, vectorised: no torch, no per-element Python.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CompressionError

MODES = ("none", "fp16", "int8")
INT8_LEVELS = 127  # symmetric: -127..127, so that 0 is exact and the range mirrors itself
_FP16_OVERFLOW = 65520.0  # halfway between float16's largest finite value (65504) and 2**16
_WIRE_DTYPES: dict[str, np.dtype] = {
    "none": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
}


def check_mode(mode: str) -> str:
    """``mode`` if it names a codec; a ValueError naming the choices otherwise."""
    if mode not in _WIRE_DTYPES:
        raise CompressionError(f"unknown compression {mode!r} (choices: {', '.join(MODES)})")
    return mode


def wire_dtype(mode: str) -> np.dtype:
    """The dtype a tensor travels in under ``mode``."""
    return _WIRE_DTYPES[check_mode(mode)]


def pack(arr: np.ndarray, mode: str) -> tuple[np.ndarray, float | None]:
    """The wire form of a float32 tensor: (data, scale); the scale is None except for int8.

    ``none`` hands the array back untouched (not even copied), so an uncompressed run is
    bit-for-bit what it was before codecs existed; its finiteness stays the receiver's check.
    ``fp16`` and ``int8`` refuse non-finite values here (a CompressionError), where the cause
    is known: a NaN, or a float16 overflow, would otherwise reach the peer as a puzzle.
    """
    check_mode(mode)
    if mode == "none":
        return arr, None
    x = np.asarray(arr, dtype=np.float32)
    if x.size == 0:
        return (
            (np.zeros(x.shape, np.float16), None)
            if mode == "fp16"
            else (np.zeros(x.shape, np.int8), 0.0)
        )
    # max and -min: two reductions, but no |x| temporary the size of the tensor. A NaN makes
    # both non-finite (numpy's max and min propagate it).
    hi, lo = float(x.max()), float(x.min())
    if not (math.isfinite(hi) and math.isfinite(lo)):
        raise CompressionError(f"non-finite values cannot be sent as {mode}")
    if mode == "fp16":
        # Checked on the input, ~10x cheaper than isfinite over the result: from 65520 up,
        # round-to-nearest-even turns a float32 into float16's infinity.
        if hi >= _FP16_OVERFLOW or lo <= -_FP16_OVERFLOW:
            raise CompressionError("values beyond float16's range (|x| >= 65520)")
        return x.astype(np.float16), None
    scale = np.float32(max(hi, -lo)) / np.float32(INT8_LEVELS)
    if scale == 0:  # all zeros (or so tiny that the scale underflows): zeros are exact enough
        return np.zeros(x.shape, np.int8), 0.0
    q = np.divide(x, scale, dtype=np.float32)
    np.rint(q, out=q)  # round half to even
    np.clip(q, -INT8_LEVELS, INT8_LEVELS, out=q)  # the float32 scale can round a hair low
    return q.astype(np.int8), float(scale)


def unpack(data: np.ndarray, scale: float | None = None, mode: str | None = None) -> np.ndarray:
    """float32 values of a wire tensor; the codec is read from its dtype, or checked: with
    ``mode`` given, any dtype but that codec's is a CompressionError.

    float32 comes back as the same array (no copy). A scale must come with int8 and only with
    int8, and be finite and non-negative.
    """
    dtype = data.dtype
    if mode is not None and dtype != wire_dtype(mode):
        raise CompressionError(
            f"{dtype} data, but training.compression = {mode!r} sends {wire_dtype(mode)}"
        )
    if dtype != np.int8:
        if scale is not None:
            raise CompressionError(f"a scale comes only with int8 data, not {dtype}")
        if dtype == np.float32:
            return data
        if dtype == np.float16:
            return data.astype(np.float32)
        raise CompressionError(f"{dtype} is not a codec's wire dtype (float32, float16, int8)")
    if scale is None:
        raise CompressionError("int8 data needs its scale")
    s = np.float32(scale)
    if not (math.isfinite(scale) and s >= 0):
        raise CompressionError(f"bad int8 scale {scale!r}")
    out = data.astype(np.float32)
    out *= s
    return out


def roundtrip(arr: np.ndarray, mode: str) -> np.ndarray:
    """``unpack(pack(arr))``: what the receiver gets. ``none`` returns ``arr`` itself."""
    data, scale = pack(arr, mode)
    return unpack(data, scale)
