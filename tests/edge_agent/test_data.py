"""Tests for edge_agent.data: dataset loading and parsing, verified downloads, partitions."""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edge_agent import data
from edge_agent.data import (
    DataError,
    RemoteFile,
    default_data_dir,
    labels_fingerprint,
    load_dataset,
    partition,
)

SHARED_FASHION = Path("/work/shared/data/fashion_mnist")


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return load_dataset("digits")


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the machine's own data (environment, OS packages) out of lookup tests."""
    monkeypatch.delenv("GAPSL_DATA_DIR", raising=False)
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion_mnist", ())


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fashion_idx(folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": np.arange(n_test, dtype=np.uint8)[::-1] % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        (folder / name).write_bytes(gzip.compress(_idx(arr)))
    return arrays


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _remotes(folder: Path, names: list[str], md5: dict[str, str] | None = None) -> tuple:
    return tuple(
        RemoteFile(n, (folder / n).resolve().as_uri(), (md5 or {}).get(n) or _md5(folder / n))
        for n in names
    )


# --- digits and normalisation ---------------------------------------------------------------


def test_digits_shapes_dtypes_ranges(digits: data.Dataset) -> None:
    assert digits.name == "digits" and digits.num_classes == 10 and digits.scale == 16.0
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.input_shape == (1, 8, 8)
    assert 0.18 < digits.x_test.shape[0] / 1797 < 0.22
    for x, y in ((digits.x_train, digits.y_train), (digits.x_test, digits.y_test)):
        assert x.dtype == np.uint8 and x.max() == 16
        assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert len(digits.mean) == len(digits.std) == 1


def test_digits_split_is_fixed_and_stratified(digits: data.Dataset) -> None:
    again = load_dataset("digits", "/nonexistent", download=True)  # other arguments are ignored
    assert np.array_equal(again.x_train, digits.x_train)
    assert np.array_equal(again.y_test, digits.y_test)
    test_share = np.bincount(digits.y_test) / (
        np.bincount(digits.y_test) + np.bincount(digits.y_train)
    )
    assert np.all(np.abs(test_share - 0.2) < 0.01)


def test_normalize_gives_standardised_float32(digits: data.Dataset) -> None:
    out = digits.normalize(digits.x_train)
    assert out.dtype == np.float32 and out.shape == digits.x_train.shape
    assert out.flags.c_contiguous
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1.0) < 1e-3
    one = digits.normalize(digits.x_train[3])
    assert np.array_equal(one, out[3])
    view = digits.x_train[:, :, ::-1, :]  # a non-contiguous input still gives contiguous output
    assert digits.normalize(view).flags.c_contiguous
    with pytest.raises(ValueError, match="expected images"):
        digits.normalize(np.zeros((2, 3, 8, 8), np.uint8))


def test_missing_scikit_learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        load_dataset("digits")


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_import_pulls_in_neither_torch_nor_scikit_learn() -> None:
    code = "import sys, edge_agent.data; print(sorted({'torch', 'sklearn'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- partitions -----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_deterministic_disjoint_covering(digits: data.Dataset, scheme: str) -> None:
    labels = digits.y_train
    parts = partition(labels, 8, scheme, seed=7, alpha=0.3)
    same = partition(labels, 8, scheme, seed=7, alpha=0.3)
    other = partition(labels, 8, scheme, seed=8, alpha=0.3)
    assert len(parts) == 8
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    for p in parts:
        assert p.dtype == np.int64 and p.size > 0 and np.all(np.diff(p) > 0)
    joined = np.concatenate(parts)
    assert np.unique(joined).size == joined.size  # disjoint
    assert np.array_equal(np.sort(joined), np.arange(labels.size))  # covering


def test_iid_is_balanced(digits: data.Dataset) -> None:
    sizes = [p.size for p in partition(digits.y_train, 7, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for p in parts:
        freq = np.bincount(labels[p], minlength=10) / p.size
        freq = freq[freq > 0]
        entropies.append(float(-(freq * np.log(freq)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_low_alpha_is_skewed(digits: data.Dataset) -> None:
    y = digits.y_train
    iid = _mean_label_entropy(y, partition(y, 8, "iid", seed=1))
    skewed = _mean_label_entropy(y, partition(y, 8, "dirichlet", seed=1, alpha=0.1))
    assert iid > 2.2  # close to log(10) = 2.30
    assert skewed < iid - 0.8
    parts = partition(y, 8, "dirichlet", seed=1, alpha=0.1)
    assert min(p.size for p in parts) >= 10


def test_shards_limit_classes_per_device(digits: data.Dataset) -> None:
    y = digits.y_train
    for spd in (2, 3):  # shards no larger than a class: each spans at most two classes
        parts = partition(y, 8, "shards", seed=4, shards_per_device=spd)
        assert all(np.unique(y[p]).size <= 2 * spd for p in parts)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_devices": 0}, "num_devices"),
        ({"scheme": "pathological"}, "unknown scheme"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"num_devices": 40}, "cannot give"),
        ({"scheme": "shards", "shards_per_device": 3, "num_devices": 10}, "too few"),
    ],
)
def test_partition_rejects_bad_requests(kwargs: dict, match: str) -> None:
    args = {"num_devices": 4, "scheme": "dirichlet", **kwargs}
    with pytest.raises(ValueError, match=match):
        partition(np.arange(20) % 5, args.pop("num_devices"), args.pop("scheme"), seed=0, **args)


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    labels = np.repeat(np.arange(2), 50)  # two classes cannot feed 10 devices at tiny alpha
    with pytest.raises(ValueError, match="raise alpha"):
        partition(labels, 10, "dirichlet", seed=0, alpha=1e-3)


def test_labels_fingerprint() -> None:
    y = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8)
    fp = labels_fingerprint(y)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert labels_fingerprint(y.astype(np.int64)) == fp  # dtype does not matter, values do
    changed = y.copy()
    changed[0] = 2
    assert labels_fingerprint(changed) != fp
    assert labels_fingerprint(y[:-1]) != fp
    assert labels_fingerprint(np.zeros(2, np.int64)) != labels_fingerprint(np.zeros(3, np.int64))


# --- folders, formats, downloads ------------------------------------------------------------


def test_npz_folder_fashion_layout(tmp_path: Path, isolated: None) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    y = (np.arange(10) % 10).astype(np.uint8)
    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    np.savez_compressed(folder / "train.npz", x=x, y=y)
    np.savez_compressed(folder / "test.npz", x=x[:4], y=y[:4])
    for where in (folder, tmp_path):  # the dataset folder or its parent
        ds = load_dataset("fashion_mnist", where, cache_dir=tmp_path / "cache")
        assert ds.x_train.shape == (10, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
        assert np.array_equal(ds.x_train[:, 0], x) and ds.y_train.dtype == np.int64
        assert ds.scale == 255.0 and ds.input_shape == (1, 28, 28)
        assert ds.mean[0] == pytest.approx(x.mean() / 255.0)
        assert ds.std[0] == pytest.approx((x / 255.0).std())


def test_npz_folder_cifar_layout(tmp_path: Path, isolated: None) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 3, 4, 9], dtype=np.uint8)
    np.savez_compressed(tmp_path / "train.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "test.npz", x=x[:2], y=y[:2])
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (6, 3, 32, 32) and ds.x_train.flags.c_contiguous
    assert ds.x_train[4, 2, 5, 7] == x[4, 5, 7, 2]
    assert len(ds.mean) == 3
    assert ds.mean[1] == pytest.approx(x[..., 1].mean() / 255.0)
    assert ds.normalize(ds.x_test).shape == (2, 3, 32, 32)


def test_npz_problems_are_data_errors(tmp_path: Path, isolated: None) -> None:
    x = np.zeros((3, 28, 28), np.uint8)
    np.savez_compressed(tmp_path / "train.npz", x=x, y=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="missing test.npz"):
        load_dataset("fashion_mnist", tmp_path)
    np.savez_compressed(tmp_path / "test.npz", x=x, y=np.full(3, 12, np.uint8))
    with pytest.raises(DataError, match="labels must lie in 0..9"):
        load_dataset("fashion_mnist", tmp_path)
    np.savez_compressed(tmp_path / "test.npz", x=np.zeros((3, 32, 32), np.uint8), y=x[:, 0, 0])
    with pytest.raises(DataError, match="do not fit fashion_mnist"):
        load_dataset("fashion_mnist", tmp_path)


def test_idx_gz_folder(tmp_path: Path, isolated: None) -> None:
    arrays = _write_fashion_idx(tmp_path)
    ds = load_dataset("fashion_mnist", tmp_path)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    assert np.array_equal(ds.x_test[:, 0], arrays["t10k-images-idx3-ubyte.gz"])
    assert np.array_equal(ds.y_train, arrays["train-labels-idx1-ubyte.gz"].astype(np.int64))


def test_idx_rejects_bad_magic_and_truncation(tmp_path: Path, isolated: None) -> None:
    _write_fashion_idx(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(b"\x00\x00\x08\x05" + bytes(8)))
    with pytest.raises(DataError, match="magic 2053"):
        load_dataset("fashion_mnist", tmp_path)
    labels.write_bytes(gzip.compress(_idx(np.zeros(12, np.uint8))[:-3]))
    with pytest.raises(DataError, match="promises"):
        load_dataset("fashion_mnist", tmp_path)


def test_download_verifies_and_caches(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "mirror"
    arrays = _write_fashion_idx(src, n_train=20, n_test=10)
    monkeypatch.setitem(data.DOWNLOADS, "fashion_mnist", _remotes(src, list(arrays)))
    cache = tmp_path / "cache"
    ds = load_dataset("fashion_mnist", download=True, cache_dir=cache)
    assert ds.x_train.shape == (20, 1, 28, 28)
    assert sorted(p.name for p in cache.iterdir()) == sorted(arrays)
    assert "downloading" in capsys.readouterr().err
    # The cache alone now suffices: break the mirror and load without downloading.
    for f in src.iterdir():
        f.unlink()
    again = load_dataset("fashion_mnist", cache_dir=cache)
    assert np.array_equal(again.x_test, ds.x_test)


def test_download_checksum_mismatch_leaves_nothing(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "mirror"
    names = list(_write_fashion_idx(src))
    wrong = {names[0]: "0" * 32}
    monkeypatch.setitem(data.DOWNLOADS, "fashion_mnist", _remotes(src, names, wrong))
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", download=True, cache_dir=cache)
    message = str(err.value)
    assert names[0] in message and "0" * 32 in message and _md5(src / names[0]) in message
    assert list(cache.iterdir()) == []


def test_corrupt_cache_entry_is_deleted(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    names = list(_write_fashion_idx(cache))
    monkeypatch.setitem(data.DOWNLOADS, "fashion_mnist", _remotes(cache, names))
    (cache / names[2]).write_bytes(b"garbage")
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("fashion_mnist", cache_dir=cache)
    assert not (cache / names[2]).exists()


def test_download_failure_is_a_data_error(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = RemoteFile("x.gz", (tmp_path / "absent.gz").as_uri(), "0" * 32)
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", (gone,))
    with pytest.raises(DataError, match="could not download"):
        load_dataset("cifar10", download=True, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cifar_binary_archive_download(
    tmp_path: Path, isolated: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (13, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(13, dtype=np.uint8) % 10
    records = np.concatenate([labels[:, None], images.reshape(13, -1)], axis=1)
    members = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    src = tmp_path / "mirror"
    src.mkdir()
    with tarfile.open(src / "cifar-10-binary.tar.gz", "w:gz") as archive:
        for i, member in enumerate(members):  # two records per train batch, three for test
            payload = records[2 * i : 2 * i + (3 if member == "test_batch.bin" else 2)].tobytes()
            info = tarfile.TarInfo("cifar-10-batches-bin/" + member)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", _remotes(src, ["cifar-10-binary.tar.gz"]))
    ds = load_dataset("cifar10", download=True, cache_dir=tmp_path / "cache")
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert np.array_equal(ds.x_train, images[:10]) and np.array_equal(ds.x_test, images[10:])
    assert np.array_equal(ds.y_test, labels[10:].astype(np.int64))


def test_missing_data_names_where_it_looked(tmp_path: Path, isolated: None) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", empty, cache_dir=cache)
    message = str(err.value)
    assert str(empty) in message and str(cache) in message and "data.download" in message
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("fashion_mnist", tmp_path / "nope", cache_dir=cache)


def test_default_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GAPSL_DATA_DIR", raising=False)
    assert default_data_dir("cifar10") is None
    monkeypatch.setenv("GAPSL_DATA_DIR", str(tmp_path))
    assert default_data_dir("cifar10") is None  # set, but no such folder
    (tmp_path / "cifar10").mkdir()
    assert default_data_dir("cifar10") == tmp_path / "cifar10"


@pytest.mark.skipif(not (SHARED_FASHION / "train.npz").is_file(), reason="shared data absent")
def test_real_fashion_mnist(tmp_path: Path) -> None:
    ds = load_dataset("fashion_mnist", SHARED_FASHION, cache_dir=tmp_path)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert ds.std[0] == pytest.approx(0.3530, abs=1e-4)
