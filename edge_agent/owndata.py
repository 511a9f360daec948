"""Datasets of one's own: ``training.dataset`` as a folder holding ``train.npz``/``test.npz``
of any input shape and class count, or as ``"package.module:loader"``.

A loader is called as ``loader(data_dir)`` (``data.dir`` on the orchestrator, the agent's
``--data-dir`` on a device; None when unset) and returns ``(x_train, y_train, x_test, y_test)``
as numpy arrays. Inputs are uint8 images (N x H x W, N x C x H x W, or N x H x W x C with C of
1, 3 or 4), uint8 or float N x D features, or float N x C x ... arrays; labels are integers from
0, and the class count is the largest label plus one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.datasets import DATASETS, Dataset, Splits, as_uint8, read_npz, require, wrap_dataset
from edge_agent.errors import DataError

_CHANNELS = (1, 3, 4)  # what the last axis of an N x H x W x C image holds


def is_loader(name: str) -> bool:
    """Whether dataset ``name`` names a loader (``package.module:loader``), not a folder.

    The rule of ``models.spec.is_spec``, restated: importing ``models`` here would load torch
    with every dataset (edge_agent.data imports none until a loader is called)."""
    return ":" in name and "/" not in name and "\\" not in name


def folder_candidates(name: str, data_dir: Path | None) -> list[Path]:
    """Where a device looks for folder dataset ``name``: the path itself (the orchestrator
    sends it resolved), then a folder of its name in ``data_dir`` and in ``$GAPSL_DATA_DIR``."""
    path = Path(name).expanduser()
    places = [path]
    roots = [
        data_dir,
        Path(os.environ["GAPSL_DATA_DIR"]) if os.environ.get("GAPSL_DATA_DIR") else None,
    ]
    places += [root.expanduser() / path.name for root in roots if root is not None]
    return list(dict.fromkeys(places))


def load_own(name: str, data_dir: Path | None) -> Dataset:
    """Dataset ``name``: a loader spec, or a folder; DataError saying what is wrong."""
    if is_loader(name):
        return own_dataset(name, _call_loader(name, data_dir), str(name))
    looked = []
    for place in folder_candidates(name, data_dir):
        npz = [place / "train.npz", place / "test.npz"]
        if place.is_dir() and any(p.is_file() for p in npz):
            require(npz)
            splits = (*read_npz(npz[0]), *read_npz(npz[1]))
            return own_dataset(name, splits, str(place))
        looked.append(str(place) if place.is_dir() else f"{place} (does not exist)")
    raise DataError(
        f"unknown dataset {name!r}: not one of {', '.join(DATASETS)}, and no folder holding "
        f"train.npz and test.npz (looked in: {'; '.join(looked)}); or name a loader as "
        '"package.module:loader"'
    )


def _call_loader(spec: str, data_dir: Path | None) -> Sequence[Any]:
    # Lazily: models imports torch, which edge_agent.data must not pull in by itself.
    from models.errors import SpecError
    from models.spec import call, resolve

    try:
        out = call(spec, resolve(spec), data_dir)
    except SpecError as exc:
        raise DataError(str(exc)) from exc
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        got = f"{len(out)} items" if isinstance(out, (tuple, list)) else type(out).__name__
        raise DataError(f"{spec} must return (x_train, y_train, x_test, y_test), got {got}")
    return out


def own_dataset(name: str, splits: Sequence[Any], where: str) -> Dataset:
    """Check and wrap a dataset of one's own; ``where`` names it in errors."""
    x_train, x_test = (
        _inputs(splits[i], f"{where}: x_{s}") for i, s in ((0, "train"), (2, "test"))
    )
    if x_train.shape[1:] != x_test.shape[1:] or x_train.dtype != x_test.dtype:
        raise DataError(
            f"{where}: train and test inputs differ: {x_train.dtype} {x_train.shape[1:]} "
            f"and {x_test.dtype} {x_test.shape[1:]}"
        )
    y_train = _labels(splits[1], len(x_train), f"{where}: y_train")
    y_test = _labels(splits[3], len(x_test), f"{where}: y_test")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise DataError(f"{where}: the labels name one class only; a classifier needs two")
    scale = 255.0 if x_train.dtype == np.uint8 else 1.0
    both: Splits = (x_train, y_train, x_test, y_test)
    return wrap_dataset(name, both, scale, num_classes)


def _inputs(x: Any, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2 or x.shape[0] == 0 or x.size == 0:
        raise DataError(f"{where}: expected N samples (N > 0) of at least one value, got {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{where}: holds NaN or infinite values")
        return np.ascontiguousarray(x, dtype=np.float32)
    if not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{where}: expected uint8 pixels or float features, got dtype {x.dtype}")
    x = as_uint8(x, Path(where))
    if x.ndim == 3:  # one channel: N x H x W
        return x.reshape(x.shape[0], 1, *x.shape[1:])
    if x.ndim == 4 and x.shape[3] in _CHANNELS and x.shape[1] not in _CHANNELS:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # HWC as saved by image libraries
    if x.ndim not in (2, 4):
        raise DataError(
            f"{where}: uint8 inputs must be N x D, N x H x W or N x C x H x W, got {x.shape}"
        )
    return x


def _labels(y: Any, count: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (count,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: expected {count} integer labels, got {y.dtype} {y.shape}")
    if y.min() < 0:
        raise DataError(f"{where}: labels must be 0 or more (classes 0..K-1)")
    return y.astype(np.int64)
