"""Run an engine to its end while one of its local agents is SIGSTOPped (or killed) partway."""

from __future__ import annotations

import asyncio
import os
import signal

from orchestrator.engine import Engine

SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))


def run_with_stopped_agent(
    engine: Engine, device: str, at_round: int, limit_s: float, sig: int = signal.SIGSTOP
) -> str:
    """The run's final status; ``device`` gets ``sig`` (by default it stops) once the run
    reaches ``at_round``."""

    async def stop() -> None:
        while engine.state.round < at_round:  # the run's own progress, bounded by the limit
            await asyncio.sleep(0.05)
        assert engine.fleet is not None
        os.kill(engine.fleet.procs[device].pid, sig)

    async def scenario() -> str:
        async with asyncio.timeout(limit_s * SCALE):
            stopper = asyncio.create_task(stop())
            try:
                return await engine.run()
            finally:
                stopper.cancel()
                proc = engine.fleet.procs.get(device) if engine.fleet is not None else None
                if proc is not None and proc.returncode is None:
                    os.kill(proc.pid, signal.SIGCONT)  # let it be stopped for good

    return asyncio.run(scenario())
