"""How fast a killed device is back: SIGKILL local agents mid-round and time their return.

A local fleet of three agents trains the default digits model; at chosen rounds one agent is
SIGKILLed. The orchestrator starts it again, and the new process dials in, takes the job and
restores its newest local checkpoint. Measured from the kill, on the run's own clock: when the
device is admitted again (``joined``) and when it holds the job again (``ready``), plus the
round it resumed from, and whether the run completed.

    python -m bench.restart [--kills 3] [--rounds 60]

The last line is one JSON object: ``back_s`` (kill -> joined, per kill), ``ready_s`` (kill ->
ready), their maxima, ``restored_rounds`` and ``status``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.config.manifest import local_device_toml, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine

MANIFEST = """
[testbed]
name = "restart-bench"
listen = "127.0.0.1:0"
[training]
algorithm = "gapsl"
rounds = {rounds}
eval_every = 10
[server]
device = "cpu"
[data]
partition = "dirichlet"
alpha = 0.5
"""
DEVICES = "".join(local_device_toml(f"d{i}", f"t{i}") for i in range(3))


async def _run(run_dir: Path, rounds: int, kill_rounds: list[int]) -> tuple[str, list[float]]:
    m = parse_manifest(MANIFEST.format(rounds=rounds) + DEVICES)
    engine = Engine(m, run_dir, manifest_to_toml(m), run_id="restart-bench")
    kills: list[float] = []

    async def killer() -> None:
        for k, r in enumerate(kill_rounds):
            while engine.state.round < r:
                await asyncio.sleep(0.02)
            assert engine.fleet is not None
            victim = f"d{k % 3}"
            kills.append(engine.records.elapsed())
            os.kill(engine.fleet.procs[victim].pid, signal.SIGKILL)
            print(f"round {r}: SIGKILL {victim}", flush=True)

    task = asyncio.create_task(killer())
    try:
        status = await engine.run()
    finally:
        task.cancel()
    return status, kills


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--rounds", type=int, default=60)
    args = p.parse_args(argv)
    # one kill every 15 rounds from round 12, each past a checkpoint (every 10 rounds)
    kill_rounds = [12 + 15 * k for k in range(args.kills)]
    if kill_rounds and kill_rounds[-1] >= args.rounds:
        p.error("--rounds too small for that many kills (one every 15 rounds from round 12)")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        status, kills = asyncio.run(_run(run_dir, args.rounds, kill_rounds))
        events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    back, ready, restored = [], [], []
    for k, t_kill in enumerate(kills):
        dev = f"d{k % 3}"

        def first(kind: str, dev: str = dev, t_kill: float = t_kill) -> dict[str, Any] | None:
            return next(
                (
                    e
                    for e in events
                    if e["event"] == kind and e.get("device") == dev and e["t"] > t_kill
                ),
                None,
            )

        joined, ready_ev = first("joined"), first("ready")
        back.append(round(joined["t"] - t_kill, 3) if joined else None)
        ready.append(round(ready_ev["t"] - t_kill, 3) if ready_ev else None)
        restored.append(ready_ev.get("restored_round") if ready_ev else None)
    for k, (b, r_s, rr) in enumerate(zip(back, ready, restored)):
        print(f"kill {k + 1}: admitted again after {b} s, holding the job after {r_s} s, "
              f"resumed from round {rr}")  # fmt: skip
    result = {
        "status": status,
        "kills": len(kills),
        "back_s": back,
        "ready_s": ready,
        "max_back_s": max((b for b in back if b is not None), default=None),
        "max_ready_s": max((r for r in ready if r is not None), default=None),
        "restored_rounds": restored,
    }
    print(json.dumps(result))
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
