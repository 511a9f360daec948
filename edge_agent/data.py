"""Datasets for training runs: where to find them, checksum-verified downloads, and the
deterministic device partitions. The one module the orchestrator and the agent import for data.

Needs only numpy at import time; scikit-learn loads lazily for digits, and torch never does.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from edge_agent.datasets import (
    CIFAR_ARCHIVE,
    DATASETS,
    FASHION_IDX_FILES,
    Dataset,
    load_digits_dataset,
    make_dataset,
    read_downloads,
    read_folder,
)
from edge_agent.errors import DataError
from edge_agent.owndata import load_own
from edge_agent.partition import PARTITION_SCHEMES, labels_fingerprint, partition

__all__ = [
    "DATASETS",
    "DOWNLOADS",
    "PARTITION_SCHEMES",
    "SYSTEM_DIRS",
    "DataError",
    "Dataset",
    "RemoteFile",
    "default_cache_dir",
    "default_data_dir",
    "labels_fingerprint",
    "load_dataset",
    "partition",
]

PathArg = Union[str, "os.PathLike[str]"]

# urllib applies it to every blocking socket operation (connect, each read), not to the whole
# download: a mirror that stalls this long is dead, while a slow but steady one may take hours.
DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset as published: where it lives and the MD5 its publisher lists."""

    filename: str
    url: str
    md5: str


_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FASHION_MD5 = (
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "25c81989df183df01b3e8a0aad5dffbe",
    "bef4ecab320f06d8554ea6380940ec79",
    "bb300cfdad3c16e7a12a480ee83cd310",
)

# What `download=True` fetches, per dataset, in the order the parsers expect. A plain module-level
# dict so a lab can point an entry at a local mirror (and tests at file:// URLs).
DOWNLOADS: dict[str, tuple[RemoteFile, ...]] = {
    "fashion_mnist": tuple(
        RemoteFile(name, _FASHION_URL + name, md5)
        for name, md5 in zip(FASHION_IDX_FILES, _FASHION_MD5)
    ),
    # The binary release (label byte + CHW pixels per record): parsing it needs no pickle.
    "cifar10": (
        RemoteFile(
            CIFAR_ARCHIVE,
            "https://www.cs.toronto.edu/~kriz/" + CIFAR_ARCHIVE,
            "c32a1d4ab5d03f1284b67883e8d87530",
        ),
    ),
}

# Folders filled by OS packages, searched when no data folder is given (Debian and Ubuntu ship
# Fashion-MNIST's idx files in the `dataset-fashion-mnist` package).
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


def default_data_dir(name: str) -> Path | None:
    """`$GAPSL_DATA_DIR/<name>` when that variable is set and the folder exists, else None."""
    root = os.environ.get("GAPSL_DATA_DIR")
    if not root:
        return None
    candidate = Path(root).expanduser() / name
    return candidate if candidate.is_dir() else None


def default_cache_dir(name: str) -> Path:
    """Where downloads of `name` are kept: `~/.cache/gapsl/<name>`."""
    return Path.home() / ".cache" / "gapsl" / name


def load_dataset(
    name: str,
    data_dir: PathArg | None = None,
    *,
    download: bool = False,
    cache_dir: PathArg | None = None,
) -> Dataset:
    """Load dataset `name`: one of DATASETS, or one's own (edge_agent.owndata): a folder
    holding `train.npz`/`test.npz`, or "package.module:loader", called with `data_dir`.

    Digits comes from scikit-learn and ignores every other argument. The image sets are looked
    up, in order, in `data_dir` (when None: `$GAPSL_DATA_DIR/<name>` if set, then the OS package
    folder) holding `train.npz`/`test.npz` (or, for Fashion-MNIST, the four idx files), also
    in its `<name>` subfolder; then in `cache_dir` (default `~/.cache/gapsl/<name>`) holding an
    earlier download; and finally, if `download` is true, fetched into `cache_dir` with every
    file's MD5 checked before use. Raises DataError naming every place it looked.
    """
    if name not in DATASETS:
        return load_own(name, None if data_dir is None else Path(data_dir).expanduser())
    if name == "digits":
        return load_digits_dataset()

    looked: list[str] = []
    folder = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(name)
    search = [] if folder is None else [folder]
    # Also accept the parent of the dataset folders (e.g. the root of a shared data tree).
    if folder is not None and (folder / name).is_dir():
        search.append(folder / name)
    if data_dir is None:
        search.extend(SYSTEM_DIRS.get(name, ()))
    for place in search:
        splits = read_folder(name, place)
        if splits is not None:
            return make_dataset(name, splits)
        looked.append(str(place) if place.is_dir() else f"{place} (does not exist)")

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(name)
    remotes = DOWNLOADS[name]
    if download or all((cache / r.filename).is_file() for r in remotes):
        paths = [_fetch(remote, cache, download) for remote in remotes]
        return make_dataset(name, read_downloads(name, paths))
    looked.append(f"{cache} (download cache)")

    layout = "train.npz and test.npz" + (
        " (or the four idx .gz files)" if name == "fashion_mnist" else ""
    )
    raise DataError(
        f"{name}: no data found. Looked in: {'; '.join(looked)}. To fix: set data.dir (agent: "
        f"--data-dir, or $GAPSL_DATA_DIR/{name}) to a folder holding {layout}; or set "
        f"data.download = true on a machine with internet access; or copy "
        f"{', '.join(r.filename for r in remotes)} into {cache}."
    )


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # a checksum, not a security control
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(remote: RemoteFile, cache: Path, download: bool) -> Path:
    """The verified cached copy of `remote`, downloaded first when missing and allowed."""
    dest = cache / remote.filename
    if dest.is_file():
        actual = _md5_of(dest)
        if actual == remote.md5:
            return dest
        # A truncated or altered cache entry must never be parsed; drop it so a retry refetches.
        dest.unlink()
        if not download:
            raise DataError(
                f"{dest}: checksum mismatch (expected md5 {remote.md5}, got {actual}); the "
                f"file was deleted. Set data.download = true to fetch it again."
            )
    if not download:
        raise DataError(f"{dest} is missing; set data.download = true to fetch it")
    cache.mkdir(parents=True, exist_ok=True)
    _download(remote, dest)
    return dest


def _download(remote: RemoteFile, dest: Path) -> None:
    """Stream `remote.url` into `dest`, checking the MD5 before the file gets its final name.

    The bytes land in a uniquely named temporary file in the same folder and are renamed only
    once the checksum matches, so local-fleet agents sharing one cache can download at the same
    time and nobody ever parses a partial or wrong file.
    """
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.md5(usedforsecurity=False)
    print(f"downloading {remote.url} -> {dest}", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(remote.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                total = int(response.headers.get("Content-Length") or 0)
                shown = -1
                for block in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    shown = _progress(remote.filename, done, total, shown)
        actual = digest.hexdigest()
        if actual != remote.md5:
            raise DataError(
                f"{remote.filename}: checksum mismatch for {remote.url}: expected md5 "
                f"{remote.md5}, got {actual}; the file was deleted. Retry, or fix the entry "
                f"in edge_agent.data.DOWNLOADS."
            )
        os.replace(tmp, dest)
    except OSError as exc:  # urllib's URLError and socket timeouts are OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"could not download {remote.url}: {exc}. Check the network, or copy "
            f"{remote.filename} into {dest.parent} by hand."
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        print(file=sys.stderr, flush=True)  # end the progress line
    elapsed = time.monotonic() - started
    print(
        f"{remote.filename}: {done / 2**20:.1f} MiB in {elapsed:.1f} s, md5 ok",
        file=sys.stderr,
        flush=True,
    )


def _progress(filename: str, done: int, total: int, shown: int) -> int:
    """Redraw the progress line every 5 % (every 4 MiB without a length); return the step."""
    step = done * 20 // total if total else done >> 22
    if step != shown:
        of_total = f"/{total / 2**20:.1f}" if total else ""
        print(
            f"\r  {filename}: {done / 2**20:.1f}{of_total} MiB",
            end="",
            file=sys.stderr,
            flush=True,
        )
    return step
