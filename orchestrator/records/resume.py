"""``gapsl-orchestrator run --resume RUN_DIR``: what an interrupted run needs to carry on.

The run directory holds everything but the device tokens (read again from the manifest file
they came from, see ``orchestrator.config.secrets``): the resolved manifest, the summary of the
interrupted run (its run id and wall time) and ``checkpoint.pt``. The resumed run appends to the
same records; rounds repeated after the checkpoint appear twice there and readers keep the later
one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orchestrator.config import secrets
from orchestrator.config.manifest import Manifest, load_manifest
from orchestrator.errors import GapslError
from orchestrator.records import checkpoint


@dataclass(frozen=True)
class Resume:
    manifest: Manifest
    run_id: str
    wall_s: float
    checkpoint: dict[str, Any] | None  # None: interrupted before its first checkpoint


def prepare_resume(
    run_dir: Path, overrides: Sequence[str] = (), other_dir: Path | None = None
) -> Resume:
    """Check that ``run_dir`` can be resumed and load what it needs; GapslError if not."""
    run_dir = Path(run_dir)
    if other_dir is not None and Path(other_dir).resolve() != run_dir.resolve():
        raise GapslError("--resume continues a run in its own directory; drop --run-dir")
    manifest_path = run_dir / "manifest.toml"
    if not manifest_path.is_file():
        raise GapslError(f"{run_dir}: no manifest.toml there; not a run directory")
    summary_path = run_dir / "summary.json"
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GapslError(f"{summary_path}: unreadable ({exc})") from exc
    if summary.get("status") == "completed":
        raise GapslError(f"{run_dir}: the run completed; there is nothing to resume")
    # The stored copy holds no tokens: they are read again from the manifest they came from.
    m = _restore_tokens(load_manifest(manifest_path, overrides), manifest_path)
    state = checkpoint.load(run_dir)
    run_id = summary.get("run_id") or (state or {}).get("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise GapslError(
            f"{run_dir}: neither summary.json nor a checkpoint names the run (the orchestrator "
            "was killed before its first checkpoint); start the run again"
        )
    if state is not None:
        missing = [d.id for d in m.devices if d.id not in state.get("clients", {})]
        if missing:
            raise GapslError(
                f"{run_dir}: the checkpoint holds no partition of {', '.join(missing)}; "
                "the manifest's devices changed since the run started"
            )
        if int(state["round"]) >= m.training.rounds:
            raise GapslError(
                f"{run_dir}: the checkpoint is of round {state['round']}, the run's last; "
                "raise training.rounds with --set to train on"
            )
    wall = summary.get("wall_s")
    if not isinstance(wall, (int, float)):
        wall = _last_event_time(run_dir)  # killed before it could write a summary
    return Resume(m, run_id, float(wall), state)


def _restore_tokens(m: Manifest, stored: Path) -> Manifest:
    """``m``, read from the run directory's ``stored`` copy, with its redacted tokens read back
    from the file that copy names; GapslError naming the way out when that cannot be done."""
    missing = [d.id for d in m.devices if d.token == secrets.REDACTED]
    origin = secrets.tokens_origin(stored.read_text(encoding="utf-8"))
    if not missing:  # never redacted (an older run), or every token given by --set
        return replace(m, tokens_from="") if origin else m
    hint = f"give them with --set devices.{missing[0]}.token=..."
    if not origin or not Path(origin).is_file():
        raise GapslError(
            f"{stored}: the run directory keeps no device tokens and the manifest they came "
            f"from ({origin or 'unknown'}) is gone; {hint}"
        )
    tokens = {d.id: d.token for d in load_manifest(origin).devices}
    absent = [i for i in missing if i not in tokens]
    if absent:
        raise GapslError(f"{origin} no longer lists {', '.join(absent)}; {hint}")
    devices = tuple(
        replace(d, token=tokens[d.id]) if d.token == secrets.REDACTED else d for d in m.devices
    )
    return replace(m, devices=devices, tokens_from=origin)


def _last_event_time(run_dir: Path) -> float:
    """The time of the run's last recorded event: how long it ran, when nothing else says."""
    from orchestrator.records.reader import read_jsonl

    rows, _ = read_jsonl(run_dir / "events.jsonl")
    times = [r["t"] for r in rows if isinstance(r.get("t"), (int, float))]
    return float(max(times, default=0.0))
