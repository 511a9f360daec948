"""What a dataset is in memory (compact uint8 images or float features, int64 labels, channel
statistics) and the parsers that build one from scikit-learn's digits, `.npz` folders, idx files
and CIFAR binaries.

File lookup and downloads live in `edge_agent.data`, the module callers import; datasets of
one's own (a folder of any shape, a loader) in `edge_agent.owndata`.
"""

from __future__ import annotations

import gzip
import hashlib
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from edge_agent.errors import DataError
from edge_agent.partition import labels_fingerprint

DATASETS = ("digits", "fashion_mnist", "cifar10")

# (channels, height, width) of each dataset as stored in `Dataset`.
SHAPES = {"digits": (1, 8, 8), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
NUM_CLASSES = 10

DIGITS_SPLIT_SEED = 12345
DIGITS_TRAIN_FRACTION = 0.8

FASHION_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch.bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the image as R, G, B planes

# idx magic numbers (big-endian): two zero bytes, type 0x08 = unsigned byte, number of dims.
_IDX_IMAGES, _IDX_LABELS = 2051, 2049

Splits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)  # eq=False: comparing or hashing big arrays is never wanted
class Dataset:
    """Train and test splits as uint8 N x C x H x W images with int64 labels (a dataset of
    one's own may also hold uint8 or float32 N x D features, or float32 N x C x ... inputs).

    Images stay in their compact integer form (a quarter of float32) until `normalize` turns a
    batch into network input; `mean` and `std` come from the training split on the [0, 1] scale
    (float inputs: scale 1), one per channel, i.e. per index of the axis after the samples'.
    """

    name: str
    x_train: np.ndarray = field(repr=False)  # repr=False: keep reprs and logs one line long
    y_train: np.ndarray = field(repr=False)
    x_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    num_classes: int
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Map stored inputs (N x C x H x W, or one C x H x W; N x D or one D for features) to
        C-contiguous float32 `(x / scale - mean) / std`, per channel."""
        x = np.asarray(x)
        channels = len(self.mean)
        dims = self.x_train.ndim - 1  # of one sample
        if x.ndim not in (dims, dims + 1) or x.shape[-dims] != channels:
            what, rest = ("images", " x H x W") if dims == 3 else ("inputs", " x ..." * (dims - 1))
            raise ValueError(
                f"{self.name}: expected {what} shaped N x {channels}{rest}, got {x.shape}"
            )
        per_channel = (channels,) + (1,) * (dims - 1)
        out = x.astype(np.float32, order="C")
        out /= np.float32(self.scale)
        out -= np.asarray(self.mean, np.float32).reshape(per_channel)
        out /= np.asarray(self.std, np.float32).reshape(per_channel)
        return out

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample: (channels, height, width) of an image."""
        return tuple(int(n) for n in self.x_train.shape[1:])

    @cached_property  # hashing a large set of one's own takes a while: once per load
    def fingerprint(self) -> str:
        """What a device checks its own copy against: the training labels' fingerprint, and
        for a dataset of one's own the training inputs' too (a loader computes them, and a
        loader that draws them at random would otherwise train every device on other data)."""
        labels = labels_fingerprint(self.y_train)
        if self.name in DATASETS:
            return labels
        digest = hashlib.sha256(labels.encode())
        digest.update(f"{self.x_train.dtype.str}{self.x_train.shape}".encode())
        digest.update(np.ascontiguousarray(self.x_train).data)
        return digest.hexdigest()[:16]


def make_dataset(name: str, splits: Splits, scale: float = 255.0) -> Dataset:
    """Validate `(x_train, y_train, x_test, y_test)` and wrap them with their statistics."""
    x_train, y_train, x_test, y_test = splits
    shape = SHAPES[name]
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != np.uint8 or x.shape[1:] != shape or y.shape != (x.shape[0],):
            raise DataError(
                f"{name} {split}: expected uint8 images N x {shape} with N labels, "
                f"got {x.dtype} {x.shape} and labels {y.shape}"
            )
        if x.shape[0] == 0:
            raise DataError(f"{name} {split}: the split is empty")
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= NUM_CLASSES:
            raise DataError(f"{name} {split}: labels must be integers in 0..{NUM_CLASSES - 1}")
    return wrap_dataset(name, splits, scale, NUM_CLASSES)


def wrap_dataset(name: str, splits: Splits, scale: float, num_classes: int) -> Dataset:
    """A Dataset of splits already checked, with the training split's channel statistics."""
    x_train, y_train, x_test, y_test = splits
    mean, std = channel_stats(x_train, scale)
    return Dataset(
        name=name,
        x_train=np.ascontiguousarray(x_train),
        y_train=np.ascontiguousarray(y_train, dtype=np.int64),
        x_test=np.ascontiguousarray(x_test),
        y_test=np.ascontiguousarray(y_test, dtype=np.int64),
        num_classes=num_classes,
        scale=float(scale),
        mean=mean,
        std=std,
    )


def channel_stats(x: np.ndarray, scale: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and population std of uint8 images on the [0, 1] scale (of
    float inputs: their float64 moments, divided by `scale`).

    uint8 pixels take 256 values, so a histogram gives the float64 moments exactly without a
    float64 copy of the whole split (376 MB for Fashion-MNIST); chunking bounds the int64
    temporaries that `bincount` makes.
    """
    levels = np.arange(256, dtype=np.float64) / scale
    means, stds = [], []
    for c in range(x.shape[1]):
        if x.dtype != np.uint8:
            values = x[:, c].astype(np.float64) / scale
            mean, std = float(values.mean()), float(values.std())
        else:
            counts = np.zeros(256, dtype=np.int64)
            for start in range(0, x.shape[0], 4096):
                counts += np.bincount(x[start : start + 4096, c].ravel(), minlength=256)
            total = counts.sum()
            mean = float(counts @ levels / total)
            std = float(np.sqrt(counts @ (levels - mean) ** 2 / total))
        means.append(mean)
        # A constant channel would divide by zero in normalize; leave it merely centred.
        stds.append(std if std > 0.0 else 1.0)
    return tuple(means), tuple(stds)


def load_digits_dataset() -> Dataset:
    """scikit-learn's 1,797 handwritten 8x8 digits (values 0..16), split 80/20 by a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(
            "the digits dataset comes with scikit-learn, which is not installed: "
            "pip install scikit-learn  (a dependency of gapsl-testbed: the install is incomplete)"
        ) from exc
    bunch = load_digits()
    x = np.asarray(bunch.data).reshape(-1, *SHAPES["digits"]).astype(np.uint8)
    y = np.asarray(bunch.target).astype(np.int64)
    # Stratified and fixed: every device and every run sees the same train/test sets, and each
    # class keeps its share in both.
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    train_parts, test_parts = [], []
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        cut = int(round(DIGITS_TRAIN_FRACTION * members.size))
        train_parts.append(members[:cut])
        test_parts.append(members[cut:])
    train = rng.permutation(np.concatenate(train_parts))
    test = rng.permutation(np.concatenate(test_parts))
    return make_dataset("digits", (x[train], y[train], x[test], y[test]), scale=16.0)


def read_folder(name: str, folder: Path) -> Splits | None:
    """Splits from `folder` (`train.npz`/`test.npz`, or Fashion-MNIST idx files), or None when
    the folder holds neither. A half-present layout is an error, not a silent miss."""
    if not folder.is_dir():
        return None
    npz = [folder / "train.npz", folder / "test.npz"]
    if any(p.is_file() for p in npz):
        require(npz)
        x_train, y_train = _read_npz(name, npz[0])
        x_test, y_test = _read_npz(name, npz[1])
        return x_train, y_train, x_test, y_test
    if name == "fashion_mnist":
        for names in (FASHION_IDX_FILES, tuple(n[: -len(".gz")] for n in FASHION_IDX_FILES)):
            idx = [folder / n for n in names]
            if any(p.is_file() for p in idx):
                require(idx)
                return read_idx_splits(idx)
    return None


def read_downloads(name: str, paths: Sequence[Path]) -> Splits:
    """Splits from the files listed for `name` in the download table, already verified."""
    if name == "cifar10":
        return read_cifar_archive(paths[0])
    return read_idx_splits(paths)


def require(paths: Sequence[Path]) -> None:
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{paths[0].parent}: incomplete dataset, missing {', '.join(missing)}")


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `x` and `y` of one split file, as stored."""
    try:
        # allow_pickle=False: an .npz may come from anywhere and must never run code.
        with np.load(path, allow_pickle=False) as archive:
            return archive["x"], archive["y"]
    except KeyError as exc:
        raise DataError(f"{path}: expected arrays 'x' and 'y' ({exc})") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc


def _read_npz(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`x` and `y` from one split file; images in either stored layout become N x C x H x W."""
    x, y = read_npz(path)
    c, h, w = SHAPES[name]
    if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        x = x.reshape(x.shape[0], 1, h, w)
    elif x.ndim == 4 and x.shape[1:] == (h, w, c) and x.shape[1:] != (c, h, w):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # HWC as saved by image libraries
    elif x.ndim != 4 or x.shape[1:] != (c, h, w):
        raise DataError(
            f"{path}: images of shape {x.shape} do not fit {name} "
            f"(expected N x {h} x {w}{'' if c == 1 else f' x {c}'} or N x {c} x {h} x {w})"
        )
    return as_uint8(x, path), _as_labels(y, x.shape[0], path)


def as_uint8(x: np.ndarray, path: Path) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255:
        return x.astype(np.uint8)
    raise DataError(f"{path}: images must be uint8 pixels 0..255, got dtype {x.dtype}")


def _as_labels(y: np.ndarray, count: int, path: Path) -> np.ndarray:
    if y.shape != (count,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: expected {count} integer labels, got {y.dtype} {y.shape}")
    if count and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}")
    return y.astype(np.int64)


def read_idx_splits(paths: Sequence[Path]) -> Splits:
    """Fashion-MNIST from its four idx files, in the order of FASHION_IDX_FILES."""
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    out = []
    pairs = ((paths[0], x_train, paths[1], y_train), (paths[2], x_test, paths[3], y_test))
    for x_path, x, y_path, y in pairs:
        if x.ndim != 3 or y.ndim != 1:
            raise DataError(f"{x_path}, {y_path}: expected an image file and a label file")
        out += [x.reshape(x.shape[0], 1, *x.shape[1:]), _as_labels(y, x.shape[0], y_path)]
    return out[0], out[1], out[2], out[3]


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (gzip-compressed if its name ends in .gz) of unsigned bytes."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError
        raise DataError(f"{path}: cannot read ({exc}); delete it and fetch it again") from exc
    magic = int.from_bytes(raw[:4], "big")
    if magic not in (_IDX_IMAGES, _IDX_LABELS):
        raise DataError(
            f"{path}: not an idx file of bytes (magic {magic}, expected "
            f"{_IDX_IMAGES} for images or {_IDX_LABELS} for labels)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{path}: idx header promises {dims} ({expected} bytes), file holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_cifar_archive(path: Path) -> Splits:
    """CIFAR-10 from the binary tarball, read member by member without extracting to disk."""
    batches: dict[str, bytes] = {}
    wanted = set(_CIFAR_TRAIN_BATCHES) | {_CIFAR_TEST_BATCH}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    handle = archive.extractfile(member)
                    if handle is not None:
                        batches[base] = handle.read()
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise DataError(f"{path}: not a readable CIFAR-10 archive ({exc})") from exc
    missing = sorted(wanted - batches.keys())
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}")
    train = [_cifar_records(batches[n], path, n) for n in _CIFAR_TRAIN_BATCHES]
    x_test, y_test = _cifar_records(batches[_CIFAR_TEST_BATCH], path, _CIFAR_TEST_BATCH)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def _cifar_records(raw: bytes, path: Path, member: str) -> tuple[np.ndarray, np.ndarray]:
    if not raw or len(raw) % _CIFAR_RECORD:
        raise DataError(
            f"{path}: {member} holds {len(raw)} bytes, not a whole number of "
            f"{_CIFAR_RECORD}-byte records"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    x = records[:, 1:].reshape(-1, *SHAPES["cifar10"]).copy()  # already channel-major
    return x, _as_labels(records[:, 0], records.shape[0], path / member)
