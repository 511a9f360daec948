"""``gapsl-agent doctor``: check a device before a run and say what to fix."""

from __future__ import annotations

import asyncio
import platform
import sys
from pathlib import Path
from typing import Callable

import psutil

from .protocol import CLOSE_NORMAL

OK, WARN, FAIL = "ok", "warn", "FAIL"
# How long the orchestrator check waits for each handshake: a reachable orchestrator on a lab
# network answers well within it, and a user running the doctor should not wait for more.
PROBE_TIMEOUT_S = 5.0
MIN_FREE_GIB = 0.5  # below this, a job's dataset and model may not fit beside the system


def _check_python() -> tuple[str, str]:
    version = platform.python_version()
    if sys.version_info < (3, 10):
        return FAIL, f"Python {version}: 3.10 or newer is required"
    return OK, f"Python {version}"


def _check_torch(device: str) -> tuple[str, str]:
    try:
        import torch
    except ImportError as exc:
        return FAIL, f"torch does not import ({exc}); install torch for this platform"
    from models import select_device

    try:
        chosen = select_device(device)
    except ValueError as exc:
        return FAIL, f"torch {torch.__version__}: {exc}"
    return OK, f"torch {torch.__version__}, compute device {chosen.type} (asked: {device})"


def _check_memory() -> tuple[str, str]:
    vm = psutil.virtual_memory()
    gib = vm.available / 2**30
    status = OK if gib >= MIN_FREE_GIB else WARN
    return status, f"{gib:.1f} GiB free of {vm.total / 2**30:.1f} GiB"


def _check_data(data_dir: Path | None) -> tuple[str, str]:
    if data_dir is None:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return WARN, "no --data-dir and no scikit-learn: only downloads can provide data"
        return OK, "no --data-dir: the bundled digits are available; other sets need a directory"
    if not data_dir.is_dir():
        return FAIL, f"{data_dir} is not a directory"
    found = []
    for folder in (data_dir, *sorted(p for p in data_dir.iterdir() if p.is_dir())):
        if (folder / "train.npz").is_file() and (folder / "test.npz").is_file():
            found.append(folder.name or str(folder))
        elif (folder / "train-images-idx3-ubyte.gz").is_file():
            found.append(f"{folder.name} (idx)")
    if not found:
        return WARN, f"{data_dir}: no train.npz/test.npz or idx files found"
    return OK, f"{data_dir}: " + ", ".join(found)


def _check_dataset(name: str, data_dir: Path | None) -> tuple[tuple[str, str], int | None]:
    """Load ``--dataset`` as a job would (a loader spec imports here); the status line and
    the class count, which the model check builds with."""
    from .data import load_dataset
    from .errors import DataError

    try:
        ds = load_dataset(name, data_dir)
    except DataError as exc:
        return (FAIL, str(exc)), None
    shape = "x".join(map(str, ds.input_shape))
    return (
        OK,
        f"{name}: {len(ds.y_train)} train / {len(ds.y_test)} test samples of {shape}, "
        f"{ds.num_classes} classes, fingerprint {ds.fingerprint}",
    ), ds.num_classes


def _check_model(name: str, num_classes: int | None) -> tuple[str, str]:
    """Build ``--model`` (a factory spec imports here) at its default cut."""
    try:
        from models import ModelError, build_split

        split = build_split(name, num_classes=num_classes or 10)
    except ImportError as exc:  # torch itself: the torch line says what to do
        return FAIL, f"cannot build models: {exc}"
    except ModelError as exc:
        return FAIL, str(exc)
    stages = [n for part in (split.client, split.server) for n, _ in part.named_children()]
    return OK, f"{name}: stages {', '.join(stages)}; cuts {', '.join(split.info.cuts)}"


async def _probe(url: str, timeout_s: float) -> None:
    from websockets.asyncio.client import connect

    async with connect(
        url, open_timeout=timeout_s, close_timeout=timeout_s, compression=None
    ) as ws:
        await ws.close(CLOSE_NORMAL, "doctor")


def _check_orchestrator(url: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[str, str]:
    if not url:
        return WARN, "no --orchestrator given: not checked"
    try:
        asyncio.run(_probe(url, timeout_s))
    except Exception as exc:  # any failure is the answer: show it to the user
        return FAIL, f"{url} does not answer: {type(exc).__name__}: {exc}"
    return OK, f"{url} answers"


def run_doctor(
    url: str | None,
    data_dir: Path | None,
    device: str,
    out: Callable[[str], None] = print,
    *,
    model: str | None = None,
    dataset: str | None = None,
) -> int:
    """Print one line per check; return 0 when nothing failed, 1 otherwise. ``model`` and
    ``dataset`` (a run's training.model and training.dataset) are built and loaded here as a
    job would, so a factory or loader of one's own that does not import here shows now."""
    classes: list[int | None] = [None]

    def dataset_check() -> tuple[str, str]:
        line, classes[0] = _check_dataset(dataset or "", data_dir)
        return line

    checks: list[tuple[str, Callable[[], tuple[str, str]]]] = [
        ("python", _check_python),
        ("torch", lambda: _check_torch(device)),
        ("memory", _check_memory),
        ("data", lambda: _check_data(data_dir)),
    ]
    if dataset:
        checks.append(("dataset", dataset_check))
    if model:
        checks.append(("model", lambda: _check_model(model, classes[0])))
    checks.append(("orchestrator", lambda: _check_orchestrator(url)))
    failed = False
    for name, check in checks:
        status, text = check()
        failed |= status == FAIL
        out(f"[{status:>4}] {name:<12} {text}")
    return 1 if failed else 0
