"""Local checkpoints of a device's client partition, so a rebooted device resumes its run.

A checkpoint holds the partition's weights, its optimizer state (momentum), the batch sampler's
position and the last round applied. They live under ``ROOT/<device id>/<run id>/round-N.pt``;
the newest few of a run are kept. Files are written whole and renamed into place, so a device
that loses power mid-write keeps its previous checkpoint. Loading refuses anything but tensors
and plain values (``weights_only``): a checkpoint directory is not a way to run code.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("edge_agent")

_NAME = re.compile(r"round-(\d+)\.pt")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _safe(name: str) -> str:
    """A name usable as one path component: no separators, and never "." or ".."."""
    name = _SAFE.sub("_", name)
    return "_" + name if name.strip(".") == "" else name


def default_root() -> Path:
    """``$XDG_STATE_HOME/gapsl-agent`` (``~/.local/state/gapsl-agent`` when unset)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "gapsl-agent"


class CheckpointStore:
    """The checkpoints of one device, by run id and round."""

    def __init__(self, root: Path, device_id: str, keep: int = 3) -> None:
        self.dir = Path(root) / _safe(device_id)
        self.keep = max(1, keep)

    def _run_dir(self, run_id: str) -> Path:
        return self.dir / _safe(run_id)

    def rounds(self, run_id: str) -> list[int]:
        """Rounds with a checkpoint for this run, oldest first."""
        try:
            names = os.listdir(self._run_dir(run_id))
        except OSError:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _NAME.fullmatch(n)))

    def save(self, run_id: str, round_: int, state: dict[str, Any]) -> Path:
        """Write a checkpoint atomically and drop all but the newest ``keep`` of the run."""
        folder = self._run_dir(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"round-{round_}.pt"
        tmp = path.with_suffix(".pt.tmp")
        with open(tmp, "wb") as f:
            torch.save({"run_id": run_id, "round": round_, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        for old in self.rounds(run_id)[: -self.keep]:
            (folder / f"round-{old}.pt").unlink(missing_ok=True)
        return path

    def drop_after(self, run_id: str, round_: int) -> None:
        """Forget checkpoints newer than ``round_``: a resumed run goes on from there, and a
        later restart must not pick up a round of the abandoned continuation."""
        for r in self.rounds(run_id):
            if r > round_:
                (self._run_dir(run_id) / f"round-{r}.pt").unlink(missing_ok=True)

    def load(self, run_id: str, round_: int | None = None) -> dict[str, Any] | None:
        """The checkpoint of ``round_`` (the newest one when None), or None if there is none.

        An unreadable file is reported and skipped, never fatal: the device then starts from
        the weights the orchestrator sends.
        """
        have = self.rounds(run_id)
        wanted = [r for r in have if r == round_] if round_ is not None else have[-1:]
        for r in wanted:
            path = self._run_dir(run_id) / f"round-{r}.pt"
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # truncated, corrupt or foreign file
                log.warning("ignoring checkpoint %s: %s", path, exc)
                return None
            if not isinstance(state, dict) or state.get("run_id") != run_id:
                log.warning("ignoring checkpoint %s: not one of run %s", path, run_id)
                return None
            return state
        return None
