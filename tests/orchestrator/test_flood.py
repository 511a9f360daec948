"""A flood of unauthenticated connections and wrong-token hellos during a real run: the run
completes, connections past the pending cap are closed with 1013, idle ones at the hello
deadline, the event log summarises the refusals instead of writing one line each, and a flood
from an address no device came from is penalised: reset at accept."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench.flood import FloodStats, flood
from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.fleet.gate import RESET_PENALISED

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
CAP = 50
HELD = 200
FLOOD_S = 4.0
MANIFEST = f"""
[testbed]
listen = "127.0.0.1:0"
max_pending_connections = {CAP}
hello_timeout_s = 1.0
refusal_summary_s = 1.0
[training]
rounds = 200
eval_every = 100
"""
MANIFEST += "".join(
    local_device_toml(i, f"t-{i}", compute_slowdown=3.0, rtt_ms=20.0) for i in ("a", "b")
)


def flooded_run(
    tmp_path: Path, text: str, held: int, source: str | None = None
) -> tuple[FloodStats, list[dict[str, Any]]]:
    """A run of ``text`` flooded from its first round for ``FLOOD_S`` (from ``source``); it
    completes all its rounds. The flood's stats and the run's events."""
    m = parse_manifest(text)
    run_dir = tmp_path / "run"
    engine = Engine(m, run_dir, manifest_to_toml(m), run_id="flood")
    training, ending = asyncio.Event(), asyncio.Event()

    def seen(name: str, rec: dict[str, Any]) -> None:
        if name == "events" and rec.get("event") == "round_started":
            training.set()
            # the flood stops a few rounds before the end, so that the orchestrator is still
            # there to count (and log) all it refused
            if int(rec.get("round", 0)) >= m.training.rounds - 5:
                ending.set()

    engine.records.subscribe(seen)

    async def main() -> tuple[str, FloodStats]:
        async with asyncio.timeout(240 * SCALE):
            run = asyncio.create_task(engine.run())
            await training.wait()
            stop = asyncio.Event()
            url = f"ws://{engine.state.listen}"
            flooding = asyncio.create_task(flood(url, "a", held, 50.0, stop, source))
            near_end = asyncio.create_task(ending.wait())
            # bounded: the flood stops by itself, or near the run's end
            await asyncio.wait({run, near_end}, timeout=FLOOD_S, return_when="FIRST_COMPLETED")
            near_end.cancel()
            stop.set()
            stats = await flooding
            return await run, stats

    status, stats = asyncio.run(main())
    assert status == "completed"
    rounds = (run_dir / "rounds.jsonl").read_text().splitlines()
    assert len(rounds) == m.training.rounds
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    # the run's own devices kept their connections throughout
    assert not [e for e in events if e["event"] == "lost"]
    return stats, events


def test_a_flood_during_a_run_is_capped_and_summarised(tmp_path: Path) -> None:
    # From the agents' own address: a listed device was admitted from there, so no penalties.
    stats, events = flooded_run(tmp_path, MANIFEST, HELD)
    # The held connections past the cap were told to try again later; the ones within it were
    # closed at the hello deadline; any far past it were reset at accept.
    assert stats.held_codes["1013"] >= HELD - 2 * CAP - 10, stats.as_dict()
    assert stats.held_codes["1002"] >= 1, stats.as_dict()
    # (and when the run finished inside the flood's time: 1001, going away, for those still
    # open, and dials refused once nobody listens; neither is a refusal of the orchestrator's)
    assert set(stats.held_codes) <= {"1013", "1002", "reset", "1001", "refused"}, stats.as_dict()
    assert stats.hello_codes["1008"] >= 10, stats.as_dict()

    refused = [e for e in events if e["event"] == "refused"]
    counted = sum(int(e.get("count", 1)) for e in refused)
    refusals = sum(stats.held_codes[c] for c in ("1013", "1002", "reset"))
    refusals += stats.hello_codes["1008"]
    summaries = [e for e in refused if e.get("summary")]
    assert summaries and max(e["count"] for e in summaries) > 1
    assert {e.get("code") for e in refused} >= {1008, 1013, 1002}
    assert counted >= 0.8 * refusals  # every refusal is accounted for ...
    assert len(refused) <= refusals / 5  # ... in far fewer lines than refusals
    assert not [e for e in events if e["event"] == "penalised"]


def test_a_flood_from_another_address_is_penalised_while_the_agents_train(tmp_path: Path) -> None:
    text = MANIFEST.replace("[training]", "penalty_after = 3\npenalty_s = 60.0\n[training]")
    stats, events = flooded_run(tmp_path, text, CAP // 5, source="127.0.0.2")  # within the cap
    # A few wrong tokens (and idle connections) are refused with their codes; from then on the
    # source is reset at accept (no handshake), for the whole of the flood.
    assert 3 <= stats.hello_codes["1008"] < 50, stats.as_dict()
    assert stats.held_codes["1002"] <= CAP // 5, stats.as_dict()
    assert stats.hello_codes["reset"] > 50 and stats.held_codes["reset"] > 0, stats.as_dict()
    penalised = [e for e in events if e["event"] == "penalised"]
    assert [(e["peer"], e["failures"], e["penalty_s"]) for e in penalised] == [
        ("127.0.0.2", 3, 60.0)
    ]
    resets = [e for e in events if e["event"] == "refused" and e["reason"] == RESET_PENALISED]
    counted = sum(int(e.get("count", 1)) for e in resets)
    assert counted >= 0.8 * (stats.hello_codes["reset"] + stats.held_codes["reset"])
    assert len(resets) <= FLOOD_S + 4  # one line, then a summary per refusal_summary_s
    assert {str(e["peer"]).rsplit(":", 1)[0] for e in resets} == {"127.0.0.2"}
