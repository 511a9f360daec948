"""What a device tells about itself: static facts at hello, live load figures while it runs."""

from __future__ import annotations

import os
import platform
import socket
import sys
from typing import Any

import psutil


def device_facts(torch_device: str = "") -> dict[str, Any]:
    """Static facts sent in ``hello``: enough for a lab engineer to tell devices apart."""
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count() or 0,
        "memory_bytes": int(psutil.virtual_memory().total),
        "torch_device": torch_device,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        facts["torch"] = str(torch.__version__)
    return facts


def _temperature_c() -> float | None:
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return None
    try:
        sensors = read()
    except (OSError, RuntimeError):
        return None
    # Prefer the SoC/CPU sensor names used on Raspberry Pi, Jetson and x86 laptops.
    for name in (
        "cpu_thermal",
        "cpu-thermal",
        "coretemp",
        "k10temp",
        "soc_thermal",
        "thermal_zone0",
    ):
        if sensors.get(name):
            return float(sensors[name][0].current)
    for entries in sensors.values():
        if entries:
            return float(entries[0].current)
    return None


def live_stats(process: psutil.Process | None = None) -> dict[str, Any]:
    """Current load: system CPU %, memory %, this process's RSS, temperature where known."""
    proc = process or psutil.Process()
    stats: dict[str, Any] = {
        "cpu_percent": float(psutil.cpu_percent(interval=None)),
        "mem_percent": float(psutil.virtual_memory().percent),
        "rss_bytes": int(proc.memory_info().rss),
    }
    temp = _temperature_c()
    if temp is not None:
        stats["temp_c"] = temp
    return stats
