"""GAPSL in the client space reports the alignment after GDA: in ``rounds.jsonl``, and so on
the GAPSL panel, live and in ``watch`` alike (both fold the same record). The blend modes'
figure is the orchestrator's own, in the round; every mode's is also the devices', reported with
their next upload (``align_after_prev``)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.ui.render import render
from orchestrator.ui.watch import snapshot_from_records

MANIFEST = """
[testbed]
name = "client-align"

[training]
dataset = "digits"
algorithm = "gapsl"
rounds = 4
eval_every = 2
batch_size = 16

[gapsl]
space = "client"
gda_mode = "{mode}"
gda_lambda = 0.5

[data]
partition = "dirichlet"
alpha = 0.5
test_limit = 100
""" + "".join("\n" + local_device_toml(d, f"tok-{d}") for d in ("a", "b", "c"))


@pytest.mark.parametrize(
    "mode,known",
    [("first_order", True), ("exact", False), ("tracking", False), ("anchor", False)],
)
def test_client_space_records_align_after(tmp_path: Path, mode: str, known: bool) -> None:
    m = parse_manifest(MANIFEST.replace("{mode}", mode))
    run_dir = tmp_path / "run"
    engine = Engine(m, run_dir, manifest_to_toml(m), run_id="align", in_process=True)
    assert asyncio.run(engine.run()) == "completed"
    rounds = [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 4
    # Every mode: the devices report what they stepped by, a round late (none before round 2).
    assert rounds[0]["align_after_prev"] is None
    for prev, r in zip(rounds, rounds[1:]):
        after = r["align_after_prev"]
        assert isinstance(after, float) and -1.0 <= after <= 1.0, r
        if known:  # ... the same figure the orchestrator worked out itself for the blend modes
            assert after == pytest.approx(prev["align_after"], abs=1e-5)
    for r in rounds:
        if known:  # first-order GDA turns every gradient toward the leader
            assert r["align_after"] > r["align_before"], r
        else:  # the other modes' aligned gradient is the device's alone
            assert r["align_after"] is None and r["align_before"] is not None
    live, watched = engine.snapshot(), snapshot_from_records(run_dir)
    assert live.gapsl == watched.gapsl and live.gapsl is not None
    latest = rounds[-1]["align_after"] if known else rounds[-1]["align_after_prev"]
    assert live.gapsl.align_after == latest and latest is not None
    console = Console(width=120, height=40, file=io.StringIO(), color_system=None)
    console.print(render(live, 120, 40))
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "→–" not in shown and f"→{latest:.2f}" in shown and "align " in shown
