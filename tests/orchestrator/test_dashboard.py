"""Golden and property tests of the dashboard renderer, the headless line formatters and the
`Live` driver."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
from pathlib import Path

import pytest
from rich.cells import cell_len
from rich.console import Console

from orchestrator.ui.live import LiveDashboard
from orchestrator.ui.log_lines import format_eval, format_event
from orchestrator.ui.render import render
from orchestrator.ui.snapshot import (
    DEVICE_STATUSES,
    DeviceView,
    EvalPoint,
    EventLine,
    GapslView,
    RoundPoint,
    RunSnapshot,
)

GOLDEN = Path(__file__).parent / "golden"


def _snapshot() -> RunSnapshot:
    """A fixed mid-run snapshot: four devices (one straggling, one lost), evals, rounds, events."""
    devices = (
        DeviceView(
            "pi-01",
            "computing",
            "remote",
            "raspberrypi-01",
            "Linux aarch64",
            "cpu",
            4,
            3.7,
            71.0,
            42.5,
            58.3,
            3.41,
            12.7,
            18.2,
            41.0,
            32,
            224,
            37,
            0.412,
            0.871,
        ),
        DeviceView(
            "jetson-02",
            "sending",
            "remote",
            "jetson-nano",
            "Linux aarch64",
            "cuda",
            4,
            3.9,
            35.0,
            61.0,
            49.0,
            0.52,
            3.2,
            88.0,
            93.5,
            64,
            448,
            37,
            0.388,
            0.902,
        ),
        DeviceView(
            "local-03",
            "straggling",
            "local",
            "",
            "Linux x86_64",
            "cpu",
            2,
            7.6,
            97.0,
            20.1,
            None,
            9.87,
            41.0,
            2.0,
            5.0,
            16,
            112,
            36,
            0.655,
            0.793,
        ),
        DeviceView(
            "local-04",
            "lost",
            "local",
            "",
            "Linux x86_64",
            "cpu",
            2,
            7.6,
            batch_size=16,
            shard_size=96,
            rounds_done=21,
            last_loss=1.02,
        ),
    )
    evals = tuple(
        EvalPoint(
            r,
            r * 1.7,
            0.3 + 0.6 * (1 - 0.93**r),
            0.2 + 0.55 * (1 - 0.92**r),
            0.35 + 0.6 * (1 - 0.94**r),
            2.2 * 0.95**r,
        )
        for r in range(5, 40, 5)
    )
    rounds = tuple(
        RoundPoint(
            r,
            1.2 + 0.3 * ((r * 7) % 5) / 5 + (0.9 if r % 11 == 0 else 0.0),
            2.3 * 0.96**r + 0.05 * ((r * 3) % 4),
            predicted_s=1.3,
            compute_s=0.8,
            uplink_s=0.2,
            server_s=0.1,
            downlink_s=0.1,
        )
        for r in range(1, 38)
    )
    events = (
        EventLine(0.4, "joined", "pi-01", "Raspberry Pi 4, 4 cores"),
        EventLine(0.6, "joined", "jetson-02", "Jetson Nano, cuda"),
        EventLine(0.9, "joined", "local-03", "local fleet"),
        EventLine(1.0, "joined", "local-04", "local fleet"),
        EventLine(1.1, "refused", "intruder", "unknown device id"),
        EventLine(2.5, "profiled", None, "compute and link measured for 4 devices"),
        EventLine(35.8, "lost", "local-04", "heartbeat timeout after 10.0 s"),
        EventLine(61.2, "straggler", "local-03", "round 36 took 3.1 s, deadline 2.6 s"),
    )
    ids = tuple(d.id for d in devices)
    cos = (
        (1.0, 0.14, 0.03, -0.05),
        (0.14, 1.0, 0.09, 0.01),
        (0.03, 0.09, 1.0, -0.12),
        (-0.05, 0.01, -0.12, 1.0),
    )
    return RunSnapshot(
        name="fmnist-gapsl-a0.1", algorithm="gapsl", dataset="fashion_mnist",
        partition="dirichlet", alpha=0.1, listen="0.0.0.0:8765", phase="training",
        round=37, rounds=150, elapsed_s=63.4, eta_s=193.0, devices=devices, evals=evals,
        recent_rounds=rounds, events=events,
        gapsl=GapslView(("pi-01", "jetson-02"), cos, ids, align_before=0.06, align_after=0.41),
        run_dir="runs/fmnist-gapsl-a0.1", message="",
    )  # fmt: skip


def _console(width: int, height: int) -> Console:
    return Console(width=width, file=io.StringIO(), color_system=None, height=height)


def _print(snap: RunSnapshot, width: int, height: int) -> str:
    console = _console(width, height)
    console.print(render(snap, console.width, console.height))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


@pytest.mark.parametrize("width,height", [(120, 40), (80, 24), (160, 48)])
def test_golden_render(width: int, height: int) -> None:
    out = _print(_snapshot(), width, height)
    path = GOLDEN / f"dashboard_{width}x{height}.txt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(out, encoding="utf-8")
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 and check it by eye"
    assert out == path.read_text(encoding="utf-8")


@pytest.mark.parametrize("width,height", [(80, 24), (100, 30), (120, 40), (200, 60)])
@pytest.mark.parametrize("phase", ["waiting", "training", "failed"])
def test_render_fits_the_terminal(width: int, height: int, phase: str) -> None:
    snap = dataclasses.replace(_snapshot(), phase=phase, message="boom " * 30)
    lines = _print(snap, width, height).splitlines()
    assert len(lines) < height
    assert max(cell_len(line) for line in lines) <= width
    if width > 80:
        # A wide terminal is used across its whole width.
        assert max(cell_len(line) for line in lines) == width


def test_render_survives_empty_and_crowded_runs() -> None:
    empty = dataclasses.replace(
        _snapshot(), devices=(), evals=(), recent_rounds=(), events=(), gapsl=None, eta_s=None
    )
    text = _print(empty, 80, 24)
    assert "no evaluation yet" in text and "no events yet" in text
    many = tuple(
        DeviceView(f"dev-{i:02d}", DEVICE_STATUSES[i % len(DEVICE_STATUSES)], "remote")
        for i in range(40)
    )
    ids = tuple(d.id for d in many)
    gapsl = GapslView(ids[:5], tuple(tuple(0.1 for _ in ids) for _ in ids), ids)
    crowded = dataclasses.replace(_snapshot(), devices=many, gapsl=gapsl)
    for width, height in [(80, 24), (120, 40)]:
        lines = _print(crowded, width, height).splitlines()
        assert len(lines) < height
        assert max(cell_len(line) for line in lines) <= width
        assert any("more" in line for line in lines)


def test_none_values_render_as_a_dash() -> None:
    text = _print(_snapshot(), 120, 40)
    lost_row = next(line for line in text.splitlines() if "local-04" in line and "lost" in line)
    assert "–" in lost_row and "None" not in text


def test_waiting_phase_names_missing_devices_and_how_to_start_them() -> None:
    snap = _snapshot()
    devices = tuple(
        dataclasses.replace(d, status="waiting") if d.id in ("jetson-02", "local-03") else d
        for d in snap.devices
    )
    waiting = dataclasses.replace(snap, phase="waiting", round=0, devices=devices, gapsl=None)
    for width, height in [(80, 24), (120, 40)]:
        text = _print(waiting, width, height)
        assert "jetson-02" in text and "local-03" in text
        flat = re.sub(r"\s*│\s*", " ", text)  # a command may fold across panel lines
        assert "gapsl-agent --orchestrator ws://0.0.0.0:8765 --id jetson-02 --token <token>" in (
            flat
        )
        assert re.findall(r"--token (\S+)", flat) == ["<token>"]


def test_format_event_is_one_greppable_line() -> None:
    e = EventLine(61.234, "straggler", "local-03", "round 36\ntook 3.1 s")
    line = format_event(e)
    assert "\n" not in line
    assert line.startswith("event=straggler device=local-03 t=61.23")
    assert format_event(EventLine(2.0, "profiled", None, "")) == "event=profiled device=- t=2.00"


def test_format_eval_is_one_greppable_line() -> None:
    line = format_eval(EvalPoint(10, 12.5, 0.912, 0.88, 0.94, 0.31), 150)
    assert "\n" not in line
    for field in ("round=10/150", "acc_mean=0.912", "acc_min=0.880", "acc_max=0.940",
                  "loss=0.310"):  # fmt: skip
        assert field in line.split()
    assert line.startswith("eval ")


def test_live_dashboard_stops_promptly() -> None:
    console = _console(120, 40)
    stop = asyncio.Event()
    calls = 0

    def snapshot_fn() -> RunSnapshot:
        nonlocal calls
        calls += 1
        if calls == 4:
            stop.set()
        return _snapshot()

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(LiveDashboard(console, 20, snapshot_fn).run(stop), timeout=5)
        return loop.time() - started

    elapsed = asyncio.run(main())
    # Four frames before the stop plus a final one; at 20 Hz that is a fraction of a second.
    assert calls == 5
    assert elapsed < 2.0
    assert "fmnist-gapsl-a0.1" in console.file.getvalue()  # type: ignore[attr-defined]


def test_live_dashboard_cancellation_is_clean() -> None:
    console = _console(80, 24)

    async def main() -> None:
        task = asyncio.create_task(LiveDashboard(console, 20, _snapshot).run(asyncio.Event()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_refresh_hz_must_be_positive() -> None:
    with pytest.raises(ValueError, match="refresh_hz"):
        LiveDashboard(_console(80, 24), 0, _snapshot)
