"""Deterministic splits of a labelled training set across devices (IID and label-skewed).

The orchestrator and every agent run the same function with the same seed, so each device can
compute its own share locally and `labels_fingerprint` lets them confirm they agree.
"""

from __future__ import annotations

import hashlib

import numpy as np

PARTITION_SCHEMES = ("iid", "dirichlet", "shards")

# Enough re-draws that moderate skew (alpha >= 0.05 with a few dozen devices) always succeeds,
# few enough that an impossible request fails within a second instead of hanging a run.
DIRICHLET_MAX_DRAWS = 1000


def labels_fingerprint(labels: np.ndarray) -> str:
    """Short sha256 hex digest of the labels as little-endian int64 bytes plus their count.

    The dtype the labels arrive in does not matter (uint8 from a file, int64 after loading), so
    an agent and the orchestrator holding the same labels always print the same fingerprint.
    """
    arr = np.ascontiguousarray(np.asarray(labels).reshape(-1), dtype="<i8")
    digest = hashlib.sha256()
    digest.update(int(arr.size).to_bytes(8, "little"))
    digest.update(arr.tobytes())
    return digest.hexdigest()[:16]


def partition(
    labels: np.ndarray,
    num_devices: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_device: int = 2,
) -> list[np.ndarray]:
    """Split sample indices `0..len(labels)-1` among `num_devices` devices.

    Returns one sorted int64 index array per device; the arrays are disjoint and non-empty.
    "iid" and "dirichlet" cover every sample, "shards" too (its shards tile the sorted set).
    The result depends only on the arguments: `np.random.default_rng(seed)` drives every draw.
    Raises ValueError for an unknown scheme, `alpha <= 0`, `num_devices < 1`, or a request that
    cannot give every device a sample.
    """
    y = _check_labels(labels)
    if isinstance(num_devices, bool) or int(num_devices) != num_devices or num_devices < 1:
        raise ValueError(f"partition: num_devices must be an integer >= 1, got {num_devices!r}")
    num_devices = int(num_devices)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"partition: unknown scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}"
        )
    # `not alpha > 0` also rejects NaN, which would otherwise make every Dirichlet draw NaN.
    if not float(alpha) > 0.0:
        raise ValueError(f"partition: alpha must be > 0, got {alpha!r}")
    if int(shards_per_device) != shards_per_device or shards_per_device < 1:
        raise ValueError(
            f"partition: shards_per_device must be an integer >= 1, got {shards_per_device!r}"
        )
    if y.size < num_devices:
        raise ValueError(
            f"partition: {y.size} samples cannot give each of {num_devices} devices at least one"
        )

    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(y.size), num_devices)
    elif scheme == "dirichlet":
        parts = _dirichlet(y, num_devices, float(alpha), rng)
    else:
        parts = _shards(y, num_devices, int(shards_per_device), rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"partition: labels must be one-dimensional, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"partition: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < 0:
        raise ValueError("partition: labels must be non-negative class indices")
    return y


def _dirichlet(
    y: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew after Hsu et al. 2019: each class is spread over devices by p ~ Dir(alpha).

    A draw is kept only if every device gets a usable amount of data; the check runs on counts,
    so a rejected draw costs O(classes x devices) and the indices are shuffled once at the end.
    """
    classes, class_sizes = np.unique(y, return_counts=True)
    min_size = max(1, min(10, y.size // (4 * num_devices)))
    concentration = np.full(num_devices, alpha)
    for _ in range(DIRICHLET_MAX_DRAWS):
        proportions = rng.dirichlet(concentration, size=classes.size)
        # Tiny alpha can underflow every gamma variate of a row to zero, giving NaN.
        if not np.all(np.isfinite(proportions)):
            continue
        cuts = _cut_points(proportions, class_sizes)
        bounds = np.concatenate(
            [np.zeros((classes.size, 1), np.int64), cuts, class_sizes[:, None]], axis=1
        )
        per_device = np.diff(bounds, axis=1).sum(axis=0)
        if per_device.min() >= min_size:
            break
    else:
        raise ValueError(
            f"partition: no Dirichlet draw in {DIRICHLET_MAX_DRAWS} gave every one of "
            f"{num_devices} devices at least {min_size} samples (alpha={alpha}, "
            f"{y.size} samples, {classes.size} classes); raise alpha or use fewer devices"
        )

    pieces: list[list[np.ndarray]] = [[] for _ in range(num_devices)]
    for row, cls in enumerate(classes):
        members = rng.permutation(np.flatnonzero(y == cls))
        for device, chunk in enumerate(np.split(members, cuts[row])):
            pieces[device].append(chunk)
    return [np.concatenate(p) for p in pieces]


def _cut_points(proportions: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """Interior split positions per class; the last device takes the remainder, so no sample is
    lost to floating-point rounding of the cumulative proportions."""
    cumulative = np.cumsum(proportions, axis=1)[:, :-1]
    cuts = (cumulative * class_sizes[:, None]).astype(np.int64)
    return np.minimum(cuts, class_sizes[:, None])


def _shards(
    y: np.ndarray, num_devices: int, shards_per_device: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into equal shards, deal shards out at random."""
    num_shards = num_devices * shards_per_device
    if y.size < num_shards:
        raise ValueError(
            f"partition: {y.size} samples are too few for {num_shards} shards "
            f"({num_devices} devices x {shards_per_device}); lower shards_per_device"
        )
    # Shuffle before the stable sort so which samples of a class share a shard depends on seed.
    shuffled = rng.permutation(y.size)
    order = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(num_devices, shards_per_device)
    return [np.concatenate([shards[s] for s in row]) for row in deal]
