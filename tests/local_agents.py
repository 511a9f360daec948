"""The agent processes a local-fleet run started, found from outside it (as ``ps`` would)."""

from __future__ import annotations

from pathlib import Path

import psutil


def agents_of(run: Path) -> list[psutil.Process]:
    """Agent processes started for this run directory (their checkpoint dir names it)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "edge_agent" in cmd and any(str(run) in c for c in cmd):
            found.append(p)
    return found
