"""Every failure a user can cause is one line naming the key or file, exit 2, from ``check`` and
from ``run`` alike (they share orchestrator/preflight.py), and no run directory is made first."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from orchestrator.errors import ExitCode

ROOT = Path(__file__).resolve().parents[2]
OWN = "tests.own_model_example"  # a factory and a loader of one's own (and broken ones)

MANIFEST = """
[testbed]
name = "pre"
runs_dir = "{runs}"

[training]
rounds = 2
eval_every = 1

[[devices]]
id = "a"
token = "ta"
launch = "local"
device = "cpu"

[[devices]]
id = "{second}"
token = "tb"
launch = "local"
device = "cpu"
"""


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port that another socket listens on for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def _manifest(tmp_path: Path, second: str = "b") -> Path:
    path = tmp_path / "m.toml"
    path.write_text(MANIFEST.format(runs=tmp_path / "runs", second=second))
    return path


def _garbage(tmp_path: Path) -> list[str]:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("not a PEM file\n")
    return [f"testbed.tls_{k}={tmp_path / (k + '.pem')}" for k in ("cert", "key", "ca")]


# (case, how to break the manifest: tmp_path, busy port -> (--set items, extra args, manifest
# second device id), what the one line must say)
Case = Callable[[Path, int], tuple[list[str], list[str], str]]
CASES: list[tuple[str, Case, list[str]]] = [
    (
        "data missing",
        lambda t, p: (
            ["training.dataset=fashion_mnist", f"data.dir={t / 'nowhere'}"],
            [],
            "b",
        ),
        ["[data].dir", "fashion_mnist: no data found", "nowhere"],
    ),
    (
        "model unknown",
        lambda t, p: (["training.model=mobilenet"], [], "b"),
        ["[training].model", "unknown model 'mobilenet'", "digits_cnn"],
    ),
    (
        "cut unknown",
        lambda t, p: (["training.cut=fc9"], [], "b"),
        ["[training].cut", "'fc9'", "conv1"],
    ),
    (
        "model does not fit the data",
        lambda t, p: (["training.model=cifar_cnn"], [], "b"),
        ["[training].model", "cifar_cnn takes 3x32x32 images, but digits has 1x8x8"],
    ),
    (
        "factory module missing",
        lambda t, p: (["training.model=mylab_absent.nets:tiny"], [], "b"),
        ["[training].model", "module 'mylab_absent.nets' does not import", "PYTHONPATH"],
    ),
    (
        "factory attribute missing",
        lambda t, p: ([f"training.model={OWN}:nothing_here"], [], "b"),
        ["[training].model", "has no attribute 'nothing_here'"],
    ),
    (
        "factory returns no stages",
        lambda t, p: ([f"training.model={OWN}:not_stages"], [], "b"),
        ["[training].model", "must return a list of (name, nn.Module) stages"],
    ),
    (
        "factory cut unknown",
        lambda t, p: ([f"training.model={OWN}:tiny_cnn", "training.cut=pool"], [], "b"),
        ["[training].cut", "'pool'", "'conv'"],
    ),
    (
        "spec without a name",
        lambda t, p: (["training.model=mylab.nets:"], [], "b"),
        ["[training].model", 'is not of the form "package.module:name"'],
    ),
    (
        "data folder without train.npz",
        lambda t, p: ([f"training.dataset={_empty_dir(t)}"], [], "b"),
        ["[training].dataset", "unknown dataset", "no folder holding train.npz"],
    ),
    (
        "loader returns three arrays",
        lambda t, p: ([f"training.dataset={OWN}:three_arrays"], [], "b"),
        ["[training].dataset", "must return (x_train, y_train, x_test, y_test), got 3 items"],
    ),
    (
        "port in use",
        lambda t, p: ([f"testbed.listen=127.0.0.1:{p}"], [], "b"),
        ["[testbed].listen", "is already in use"],
    ),
    (
        "TLS files missing",
        lambda t, p: (
            [f"testbed.tls_{k}={t / 'none' / (k + '.pem')}" for k in ("cert", "key", "ca")],
            [],
            "b",
        ),
        ["[testbed].tls_cert", "none/cert.pem: no such file"],
    ),
    (
        "TLS files unreadable",
        lambda t, p: (_garbage(t), [], "b"),
        ["[testbed].tls_cert", "not a usable PEM certificate and key"],
    ),
    (
        "compute device missing",
        # whichever of the two this machine lacks (no machine has both)
        lambda t, p: (
            [f"devices.b.device={'mps' if torch.cuda.is_available() else 'cuda'}"],
            [],
            "b",
        ),
        ["[devices.b].device", "requested but", "not available"],
    ),
    (
        "device id twice",
        lambda t, p: ([], [], "a"),
        ["m.toml: [devices.a].id: duplicate device id (also devices[0])"],
    ),
    (
        "run directory exists",
        lambda t, p: ([], ["--run-dir", str(_full_dir(t))], "b"),
        ["run-taken: the run directory already exists", "run --resume"],
    ),
]


def _empty_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "my-images"
    folder.mkdir(exist_ok=True)
    return folder


def _full_dir(tmp_path: Path) -> Path:
    taken = tmp_path / "run-taken"
    taken.mkdir(exist_ok=True)
    (taken / "metrics.jsonl").write_text("")
    return taken


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(("case", "breaks", "says"), CASES, ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_and_exit_2(
    command: str,
    case: str,
    breaks: Case,
    says: list[str],
    tmp_path: Path,
    busy_port: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sets, extra, second = breaks(tmp_path, busy_port)
    manifest = _manifest(tmp_path, second)
    argv = [command, str(manifest), *extra]
    argv += ["--no-dashboard"] if command == "run" else []
    for item in sets:
        argv += ["--set", item]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == ExitCode.USAGE, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gapsl-orchestrator: "), err
    for text in says:
        assert text in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "runs").exists()  # nothing was started, no run directory made


def test_check_ok_on_a_manifest_run_starts_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty-run"
    empty.mkdir()  # an empty directory is no earlier run's: run may write there
    assert main(["check", str(_manifest(tmp_path)), "--run-dir", str(empty)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "ok — psl on digits" in out and "digits_cnn cut at conv1" in out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_real_command_prints_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    manifest = str(_manifest(tmp_path))
    broken = ["--set", "training.dataset=cifar10", "--set", f"data.dir={tmp_path / 'no'}"]
    plain = _cli("run", manifest, "--no-dashboard", *broken)
    assert plain.returncode == ExitCode.USAGE
    assert plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert "[data].dir: cifar10: no data found" in plain.stderr
    debug = _cli("run", manifest, "--debug", *broken)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "DataError" in debug.stderr
