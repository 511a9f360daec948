"""The in-process reference engine (``gapsl-orchestrator simulate``) is an oracle for the
distributed one: on the same manifest and seed, a local fleet of real agent processes over real
WebSockets writes the same ``metrics.jsonl`` and the same per-round training losses.

Both engines run the same round loop, trainers and server rules on the same batches, so the
numbers are expected to agree exactly; the comparison allows ``TOL`` (absolute) so that a
harmless change of float summation order on one side fails loudly only beyond it. Measured on
this code (torch 2.13, CPU): differences of exactly 0.0 for psl, gapsl (client space,
first-order), sfl, and also for gapsl (server space, exact, lam 0.1) and epsl (phi 0.5), which
are left out here to keep the suite fast (each distributed run costs agent start-up time).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from orchestrator.config.manifest import (
    Manifest,
    local_device_toml,
    manifest_to_toml,
    parse_manifest,
)
from orchestrator.engine import Engine
from orchestrator.training import job as job_module
from orchestrator.training.job import prepare_job

TOL = 1e-6  # absolute, on accuracies (multiples of 1/len(test set)) and mean losses
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
METRICS = ("acc_mean", "acc_min", "acc_max", "loss")

CASES: dict[str, list[str]] = {
    "psl": ["training.algorithm=psl"],
    "gapsl-client": [
        "training.algorithm=gapsl",
        "gapsl.space=client",
        "gapsl.gda_mode=first_order",
    ],
    "sfl": ["training.algorithm=sfl", "sfl.avg_every=3"],
    "gapsl-tracking": [
        "training.algorithm=gapsl",
        "gapsl.space=client",
        "gapsl.gda_mode=tracking",
    ],
    "gapsl-anchor": [
        "training.algorithm=gapsl",
        "gapsl.space=client",
        "gapsl.gda_mode=anchor",
        "gapsl.prior_tau=1",
    ],
}

_DEVICES = "".join("\n" + local_device_toml(f"dev{i}", f"tok-{i}") for i in range(3))


def _manifest(overrides: list[str]) -> Manifest:
    text = f"""
[testbed]
name = "reference-equality"
listen = "127.0.0.1:0"
join_timeout_s = {120.0 * SCALE}
round_timeout_s = {60.0 * SCALE}

[training]
dataset = "digits"
rounds = 12
eval_every = 6
seed = 2

[server]
device = "cpu"

[data]
partition = "dirichlet"
alpha = 0.5
{_DEVICES}"""
    return parse_manifest(text, source="reference-equality.toml", overrides=overrides)


async def _run(
    name: str, run_dir: Path, in_process: bool, on_listening: Callable[[str], None] | None = None
) -> str:
    m = _manifest(CASES[name])
    engine = Engine(m, run_dir, manifest_to_toml(m), run_id=name, in_process=in_process)
    return await engine.run(on_listening)


def _setter(event: asyncio.Event) -> Callable[[str], None]:
    return lambda _url: event.set()


async def _run_all(root: Path) -> dict[str, str]:
    statuses = {}
    # The reference engine is quick and blocks the loop while it trains: run it first.
    for name in CASES:
        statuses[f"{name}/simulate"] = await _run(name, root / name / "simulate", True)
    # The distributed runs spend most of their time starting agents: overlap them. Each one
    # starts once the previous one listens, i.e. has built its job: building initial weights
    # seeds torch's process-wide generator, so concurrent builds would interleave (see
    # test_concurrently_prepared_jobs_start_from_the_same_weights).
    tasks: dict[str, asyncio.Task[str]] = {}
    try:
        for name in CASES:
            listening = asyncio.Event()
            task = asyncio.ensure_future(
                _run(name, root / name / "distributed", False, _setter(listening))
            )
            tasks[name] = task
            waiter = asyncio.ensure_future(listening.wait())
            await asyncio.wait({task, waiter}, timeout=60 * SCALE, return_when="FIRST_COMPLETED")
            waiter.cancel()
        done = await asyncio.wait_for(asyncio.gather(*tasks.values()), timeout=240 * SCALE)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    statuses.update({f"{n}/distributed": s for n, s in zip(tasks, done)})
    return statuses


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("reference-equality")
    # The server partition is tiny; one thread avoids contention with the agent processes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        statuses = asyncio.run(_run_all(root))
    finally:
        torch.set_num_threads(before)
    failed = {k: s for k, s in statuses.items() if s != "completed"}
    assert not failed, f"runs did not complete: {failed}"
    yield root


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _worst(a: dict[str, Any], b: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {k: abs(float(a[k]) - float(b[k])) for k in keys}


@pytest.mark.parametrize("name", list(CASES))
def test_simulate_reproduces_the_distributed_metrics(runs: Path, name: str) -> None:
    ref = _jsonl(runs / name / "simulate" / "metrics.jsonl")
    dist = _jsonl(runs / name / "distributed" / "metrics.jsonl")
    assert [r["round"] for r in ref] == [r["round"] for r in dist] == [6, 12]
    for a, b in zip(ref, dist):
        diff = _worst(a, b, METRICS)
        assert max(diff.values()) <= TOL, f"{name}, round {a['round']}: {diff}"
        assert a["acc"].keys() == b["acc"].keys()
        for dev in a["acc"]:
            assert abs(a["acc"][dev] - b["acc"][dev]) <= TOL, f"{name}, {dev}, round {a['round']}"
    # Learning happened, so agreement is not two runs stuck at chance.
    assert ref[-1]["acc_mean"] > 0.5


@pytest.mark.parametrize("name", list(CASES))
def test_simulate_reproduces_every_rounds_training_loss(runs: Path, name: str) -> None:
    ref = _jsonl(runs / name / "simulate" / "rounds.jsonl")
    dist = _jsonl(runs / name / "distributed" / "rounds.jsonl")
    assert [r["round"] for r in ref] == [r["round"] for r in dist] == list(range(1, 13))
    for a, b in zip(ref, dist):
        assert abs(a["loss"] - b["loss"]) <= TOL, f"{name}, round {a['round']}"
        assert a["leaders"] == b["leaders"], f"{name}, round {a['round']}: LGI chose differently"
    summaries = [
        json.loads((runs / name / side / "summary.json").read_text(encoding="utf-8"))
        for side in ("simulate", "distributed")
    ]
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert summaries[0]["final_acc_mean"] == pytest.approx(summaries[1]["final_acc_mean"], abs=TOL)


@pytest.mark.parametrize("name", ["gapsl-client", "gapsl-tracking", "gapsl-anchor"])
def test_simulate_records_the_devices_alignment_as_the_fleet_reports_it(
    runs: Path, name: str
) -> None:
    """The devices' cos(g', g_L), piggybacked on the next client_grad upload by a real agent and
    handed over by the trainer in-process, is the same figure in both engines."""
    ref = _jsonl(runs / name / "simulate" / "rounds.jsonl")
    dist = _jsonl(runs / name / "distributed" / "rounds.jsonl")
    assert ref[0]["align_after_prev"] is None and dist[0]["align_after_prev"] is None
    for a, b in zip(ref[1:], dist[1:]):
        after = a["align_after_prev"]
        assert isinstance(after, float) and -1.0 <= after <= 1.0, f"{name}, round {a['round']}"
        assert abs(after - b["align_after_prev"]) <= TOL, f"{name}, round {a['round']}"


def test_concurrently_prepared_jobs_start_from_the_same_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several engines in one process (a sweep, or this module) build their jobs in worker
    threads. Seeding torch's process-wide generator and then drawing initial weights from it is
    not atomic, so a concurrent build can take some of the draws. A barrier between the seed
    and the draws makes the interleaving certain; a build that is made atomic (a lock) never
    lets three threads meet there, and each goes on after the barrier's timeout."""
    m = _manifest(CASES["psl"])
    reference = prepare_job(m)
    real_build = job_module.build_split
    barrier = threading.Barrier(3, timeout=2.0 * SCALE)

    def build_after_everyone_seeded(*args: Any, **kwargs: Any) -> Any:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        return real_build(*args, **kwargs)

    monkeypatch.setattr(job_module, "build_split", build_after_everyone_seeded)
    with ThreadPoolExecutor(3) as pool:
        jobs = list(pool.map(lambda _: prepare_job(m), range(3)))
    for job in jobs:
        for key, value in reference.client_init.items():
            assert (job.client_init[key] == value).all(), f"client partition {key} differs"
        for p, q in zip(job.server.parameters(), reference.server.parameters()):
            assert torch.equal(p, q), "server partition differs"
