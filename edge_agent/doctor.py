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
    url: str | None, data_dir: Path | None, device: str, out: Callable[[str], None] = print
) -> int:
    """Print one line per check; return 0 when nothing failed, 1 otherwise."""
    checks = [
        ("python", _check_python),
        ("torch", lambda: _check_torch(device)),
        ("memory", _check_memory),
        ("data", lambda: _check_data(data_dir)),
        ("orchestrator", lambda: _check_orchestrator(url)),
    ]
    failed = False
    for name, check in checks:
        status, text = check()
        failed |= status == FAIL
        out(f"[{status:>4}] {name:<12} {text}")
    return 1 if failed else 0
