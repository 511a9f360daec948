"""Reading run directories back: the summary, the resolved manifest and the JSONL records.

The reader is forgiving where a run can legitimately leave a mess behind (a killed orchestrator
may stop in the middle of a JSONL line and never write ``summary.json``) and strict elsewhere: a
directory that is not a run directory, or a record file damaged before its last line, is a
``RunError`` naming the path.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from orchestrator.config.manifest import Manifest, parse_manifest
from orchestrator.errors import ManifestError, RunError

__all__ = [
    "RECORD_NAMES",
    "Run",
    "RunStats",
    "by_round",
    "collect",
    "finite",
    "last_rounds",
    "load_run",
    "read_jsonl",
]

# Kept in step with ``records.RECORD_FILES``; spelled out here so reading a run directory
# never depends on the writer's module.
RECORD_NAMES = ("metrics", "rounds", "devices", "events")
# Settings that do not change what a run learns: runs differing only in these (and the seed)
# are repeats of one configuration. Where the data sit and what runs the compute do not count.
_NOT_CONFIG = (
    "training.seed",
    "testbed.",
    "dashboard.",
    "ray.",
    "source",
    "base_dir",
    "server.device",
    "data.dir",
    "data.download",
)
_NOT_DEVICE_CONFIG = ("launch", "device", "num_cpus", "num_gpus", "memory_mb", "node_ip")


@dataclass(frozen=True)
class Run:
    """One run directory as read from disk.

    ``summary`` is empty when ``summary.json`` is missing (a run still going, or one killed
    before it could write it). ``manifest`` is None when the stored manifest no longer parses
    (written by another version, or edited by hand); ``manifest_error`` then says why.
    ``dropped`` maps a record name to the number of truncated trailing lines left out (0 or 1).
    """

    path: Path
    name: str
    summary: Mapping[str, Any]
    manifest_text: str
    manifest: Manifest | None
    manifest_error: str
    metrics: tuple[dict[str, Any], ...]
    rounds: tuple[dict[str, Any], ...]
    devices: tuple[dict[str, Any], ...]
    events: tuple[dict[str, Any], ...]
    dropped: Mapping[str, int] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``completed`` / ``failed`` / ``interrupted`` from the summary, else ``incomplete``."""
        status = self.summary.get("status")
        return str(status) if status else "incomplete"

    def setting(self, key: str, default: Any = None) -> Any:
        """A value by dotted manifest path (``"data.alpha"``), falling back to the summary's
        top-level copy of the last part (``algorithm``, ``dataset``, ``seed``), then ``default``."""
        if self.manifest is not None:
            node: Any = self.manifest
            for part in key.split("."):
                node = getattr(node, part, None)
                if node is None:
                    break
            if node is not None:
                return node
        return self.summary.get(key.rpartition(".")[2], default)


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of one JSONL file and how many truncated trailing lines were dropped (0 or 1).

    Only the last line may be cut short: the writer flushes whole lines, so a kill can only
    interrupt the line being written. A bad line anywhere else means the file was damaged.
    A missing file reads as no records.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise RunError(f"{path}: cannot read: {exc}") from exc
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    records: list[dict[str, Any]] = []
    dropped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == last:
                dropped = 1
                continue
            raise RunError(f"{path}:{number}: not a JSON record ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise RunError(f"{path}:{number}: a record must be a JSON object")
        records.append(record)
    return records, dropped


def last_rounds(run_dir: Path) -> dict[str, int]:
    """The highest round ``rounds.jsonl`` and ``metrics.jsonl`` hold (0 for none), by name:
    what a resumed run will record again when it goes back to an earlier checkpoint."""
    held = {}
    for name in ("rounds", "metrics"):
        rows, _ = read_jsonl(Path(run_dir) / f"{name}.jsonl")
        held[name] = max((r for r in (rec.get("round") for rec in rows) if _is_round(r)), default=0)
    return held


def _is_round(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RunError(f"{path}: cannot read: {exc}") from exc
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as exc:
        # The writer replaces summary.json atomically, so a broken one was damaged afterwards.
        raise RunError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(summary, dict):
        raise RunError(f"{path}: the summary must be a JSON object")
    return summary


def load_run(path: str | Path) -> Run:
    """Read the run directory at ``path``.

    Raises RunError when ``path`` is not a directory or holds no ``manifest.toml`` (the first
    file every run writes), or when a record file is damaged.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a directory"
        raise RunError(f"{run_dir}: {what}; expected a run directory")
    manifest_path = run_dir / "manifest.toml"
    if not manifest_path.is_file():
        raise RunError(
            f"{run_dir}: not a run directory (no manifest.toml; a run directory holds "
            "manifest.toml, metrics.jsonl, rounds.jsonl, devices.jsonl, events.jsonl "
            "and summary.json)"
        )
    try:
        manifest_text = manifest_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{manifest_path}: cannot read: {exc}") from exc
    manifest: Manifest | None = None
    manifest_error = ""
    try:
        manifest = parse_manifest(manifest_text, source=str(manifest_path), base_dir=run_dir)
    except ManifestError as exc:
        manifest_error = str(exc)
    records: dict[str, tuple[dict[str, Any], ...]] = {}
    dropped: dict[str, int] = {}
    for name in RECORD_NAMES:
        rows, cut = read_jsonl(run_dir / f"{name}.jsonl")
        records[name] = tuple(rows)
        if cut:
            dropped[name] = cut
    return Run(
        path=run_dir,
        name=run_dir.resolve().name,
        summary=_read_summary(run_dir / "summary.json"),
        manifest_text=manifest_text,
        manifest=manifest,
        manifest_error=manifest_error,
        metrics=records["metrics"],
        rounds=records["rounds"],
        devices=records["devices"],
        events=records["events"],
        dropped=dropped,
    )


# --- what a report shows of a run -----------------------------------------------------------


def finite(value: Any) -> float | None:
    """A finite number, else None (records write NaN and inf as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def by_round(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records keyed by ``round``, the latest kept: a resumed run records the rounds past its
    checkpoint again (those copies carry ``"repeat": true``), and the later copy is the run's."""
    latest: dict[int, dict[str, Any]] = {}
    for rec in records:
        r = rec.get("round")
        if _is_round(r):
            latest[r] = rec
    return [latest[r] for r in sorted(latest)]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(value, (list, tuple)):
        items = {}
        for i, v in enumerate(value):
            # Devices are named by id rather than position, and their tokens are secrets.
            key = v.get("id", i) if isinstance(v, dict) else i
            items[str(key)] = (
                {k: x for k, x in v.items() if k != "token"} if isinstance(v, dict) else v
            )
        return _flatten(items, prefix)
    return {prefix.rstrip("."): value}


@dataclass(frozen=True)
class RunStats:
    """What the report shows of one run. Accuracies are fractions; None when not recorded."""

    run: Run
    label: str
    algorithm: str
    dataset: str
    partition: str
    seed: Any
    devices: int | None
    rounds: int | None
    final_mean: float | None
    final_min: float | None
    final_max: float | None
    best_mean: float | None
    evals: tuple[dict[str, Any], ...]
    breakdown: dict[str, float]
    mean_round_s: float | None
    wall_s: float | None
    config: dict[str, Any]

    def reached(self, target: float) -> int | None:
        """The first evaluated round whose mean accuracy reaches ``target``."""
        for e in self.evals:
            if e["acc_mean"] >= target:
                return int(e["round"])
        return None


def _partition(run: Run) -> str:
    kind = run.setting("data.partition")
    if kind == "dirichlet":
        return f"dirichlet α={run.setting('data.alpha')}"
    if kind == "shards":
        return f"shards ×{run.setting('data.shards_per_device')}"
    return str(kind) if kind else "?"


def _breakdown(rounds: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per round of each phase; a round waits for its slowest device."""
    parts = {"compute": 0.0, "uplink": 0.0, "server": 0.0, "downlink": 0.0}
    for rec in rounds:
        devs = [d for d in (rec.get("devices") or {}).values() if isinstance(d, dict)]

        def slowest(key: str, devs: list[dict[str, Any]] = devs) -> float:
            return max((finite(d.get(key)) or 0.0 for d in devs), default=0.0)

        parts["compute"] += slowest("compute_s")
        parts["uplink"] += slowest("uplink_s")
        parts["server"] += finite(rec.get("server_s")) or 0.0
        down = finite(rec.get("downlink_s"))
        parts["downlink"] += down if down is not None else slowest("downlink_s")
    return {k: v / len(rounds) for k, v in parts.items()} if rounds else {}


def _stats(run: Run, label: str) -> RunStats:
    s = run.summary
    evals = tuple(e for e in by_round(run.metrics) if finite(e.get("acc_mean")) is not None)
    rounds = by_round(run.rounds)
    last = evals[-1] if evals else {}

    def final(key: str) -> float | None:
        value = finite(s.get(f"final_{key}"))
        return value if value is not None else finite(last.get(key))

    times = [t for t in (finite(r.get("round_time_s")) for r in rounds) if t is not None]
    wall = finite(s.get("wall_s"))
    if wall is None and run.events:
        wall = finite(run.events[-1].get("t"))
    n_devices = len(s["devices"]) if isinstance(s.get("devices"), list) else None
    if n_devices is None and run.manifest is not None:
        n_devices = len(run.manifest.devices)
    n_rounds = s.get("rounds") if isinstance(s.get("rounds"), int) else None
    config: dict[str, Any] = {}
    if run.manifest is not None:
        flat = _flatten(asdict(run.manifest))
        config = {
            k: v
            for k, v in flat.items()
            if not k.startswith(_NOT_CONFIG)
            and not (k.startswith("devices.") and k.rpartition(".")[2] in _NOT_DEVICE_CONFIG)
        }
    return RunStats(
        run=run,
        label=label,
        algorithm=str(run.setting("training.algorithm", "?")),
        dataset=str(run.setting("training.dataset", "?")),
        partition=_partition(run),
        seed=run.setting("training.seed", "?"),
        devices=n_devices,
        rounds=n_rounds if n_rounds is not None else (rounds[-1]["round"] if rounds else 0),
        final_mean=final("acc_mean"),
        final_min=final("acc_min"),
        final_max=final("acc_max"),
        best_mean=max((e["acc_mean"] for e in evals), default=None),
        evals=evals,
        breakdown=_breakdown(rounds),
        mean_round_s=statistics.fmean(times) if times else None,
        wall_s=wall,
        config=config,
    )


def collect(runs: Sequence[Run]) -> list[RunStats]:
    """Per-run statistics, each labelled by its directory name (made unique with its parent)."""
    names = [r.name for r in runs]
    labels = [
        f"{r.path.resolve().parent.name}/{r.name}" if names.count(r.name) > 1 else r.name
        for r in runs
    ]
    return [_stats(r, label) for r, label in zip(runs, labels)]
