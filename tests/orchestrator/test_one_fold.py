"""One fold: a real local-fleet run's live dashboard and `watch`'s view of its run directory are
the same snapshot — after every record the run writes, and field by field at its end.

Three real agent processes over real WebSockets train GAPSL (server space, so the GAPSL panel
has leaders, cosines, churn and both alignment figures) on the bundled digits for a few rounds
with two evaluations.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.ui.snapshot import RunSnapshot
from orchestrator.ui.watch import RunWatcher, snapshot_from_records

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
DEVICES = ("dev-a", "dev-b", "dev-c")
ROUNDS = 6

MANIFEST = f"""
[testbed]
name = "one-fold"
listen = "127.0.0.1:0"
join_timeout_s = {120.0 * SCALE}
round_timeout_s = {60.0 * SCALE}

[training]
dataset = "digits"
algorithm = "gapsl"
rounds = {ROUNDS}
eval_every = 3
seed = 4

[gapsl]
space = "server"

[server]
device = "cpu"

[data]
partition = "dirichlet"
alpha = 0.5
test_limit = 200
""" + "".join("\n" + local_device_toml(d, f"tok-{d}") for d in DEVICES)

# Mid-run, each reader has its own clock: the engine's monotonic one since the run started,
# `watch` the wall clock since manifest.toml was written. These two fields are read off those
# clocks, so they differ by construction; nothing else may. (At the end both come from the
# final event's wall_s and the finished rounds, so the final comparison excludes nothing.)
CLOCK_FIELDS = ("elapsed_s", "eta_s")


def _differences(live: RunSnapshot, watched: RunSnapshot, skip: tuple[str, ...]) -> list[str]:
    out = []
    for f in dataclasses.fields(RunSnapshot):
        a, b = getattr(live, f.name), getattr(watched, f.name)
        if f.name not in skip and a != b:
            out.append(f"{f.name}:\n  live    {a!r}\n  watched {b!r}")
    return out


def test_live_dashboard_and_watch_are_one_fold(tmp_path: Path) -> None:
    m = parse_manifest(MANIFEST)
    run_dir = tmp_path / "run"
    engine = Engine(m, run_dir, manifest_to_toml(m, absolute_paths=True), run_id="one-fold")
    watcher = RunWatcher(run_dir)  # follows the files as a second terminal would
    compared: collections.Counter[str] = collections.Counter()
    mismatches: list[str] = []

    def compare(name: str, record: dict[str, Any]) -> None:
        # Subscribed after the engine's own fold, so both have seen this record.
        diff = _differences(engine.snapshot(), watcher.snapshot(), CLOCK_FIELDS)
        if diff and len(mismatches) < 3:
            mismatches.append(f"after {name} {record}:\n" + "\n".join(diff))
        compared[name] += 1

    engine.records.subscribe(compare)
    status = asyncio.run(asyncio.wait_for(engine.run(), 240 * SCALE))
    assert status == "completed", engine.snapshot().message
    assert not mismatches, "\n\n".join(mismatches)
    assert {"events", "devices", "rounds", "metrics"} <= set(compared), compared

    live = engine.snapshot()
    watched = snapshot_from_records(run_dir)
    assert not (diff := _differences(live, watched, ())), "\n".join(diff)

    # ... and the snapshot compared holds what the run did, not empty defaults.
    assert (live.phase, live.round, live.rounds) == ("completed", ROUNDS, ROUNDS)
    assert [e.round for e in live.evals] == [3, 6] and live.eta_s == 0.0
    assert [r.round for r in live.recent_rounds] == list(range(1, ROUNDS + 1))
    assert live.listen != "127.0.0.1:0" and live.listen.startswith("127.0.0.1:")
    assert [(d.id, d.status, d.launch) for d in live.devices] == [
        (d, "done", "local") for d in DEVICES
    ]
    for d in live.devices:
        assert d.hostname and d.platform and d.torch_device == "cpu" and d.cpu_count > 0
        assert d.memory_gib > 0 and d.shard_size > 0 and d.batch_size > 0
        assert d.rounds_done == ROUNDS and d.last_loss is not None and d.accuracy is not None
        assert d.compute_ms_per_sample is not None and d.rtt_ms is not None
        assert d.uplink_mbps is not None and d.downlink_mbps is not None
    g = live.gapsl
    assert g is not None and g.device_ids == DEVICES and len(g.cosine) == len(DEVICES)
    assert set(g.leaders) <= set(DEVICES) and g.churn is not None
    assert g.align_before is not None and g.align_after is not None
    shown = {e.event for e in live.events}
    assert {"listening", "joined", "ready", "profiled", "run_completed"} <= shown
    assert not shown & {"round_started", "phase"}  # progress is the header's, not the log's
