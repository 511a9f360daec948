"""``launch = "ray"`` on a real two-node Ray cluster started here (``ray.cluster_utils``).

The head offers one CPU and the worker two, and each agent asks for one, so three devices are
placed across both nodes; a third node declares one GPU and no CPU, for ``num_gpus``. A run there writes the metrics of ``simulate`` on the same manifest;
an agent actor killed mid-run is placed again and the run completes; Ctrl-C on an
orchestrator process leaves no actor of its run alive; ``address = "local"`` gives a run its
own one-machine instance, with local agents beside; ``ray://`` joins through Ray Client (the
head serves it) to the same metrics. Skipped only where Ray (or, for ray://, grpcio) is missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config.manifest import Manifest, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.ui.fold import RunFold
from orchestrator.ui.render import _host as render_host
from orchestrator.ui.watch import read_records

ROOT = Path(__file__).resolve().parent.parent
SCALE = float(os.environ.get("GAPSL_TEST_TIMEOUT_SCALE", "1"))
TOL = 1e-6  # as in tests/orchestrator/test_reference_equality.py
METRICS = ("acc_mean", "acc_min", "acc_max", "loss")
NODE_MEMORY = 80 * 2**20  # each node's object store: the runs put nothing in it
# Run ids of their own: an agent stopped at a run's end (not ended normally) leaves its node
# folder, checkpoints included, for a resume of that run id (README, "During and after the
# run"), and a later run of the same id on this machine would resume from it.
RUN = uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="Ray is not installed (the [ray] extra)")
    from ray.cluster_utils import Cluster

    made = None
    try:
        try:
            client_port = _free_port()
            made = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 1,
                    "object_store_memory": NODE_MEMORY,
                    # Ray Client's server on the head, for ray:// (needs grpcio: ray[client])
                    "ray_client_server_port": client_port,
                },
            )
            made.client_port = client_port  # type: ignore[attr-defined]
            made.add_node(num_cpus=2, object_store_memory=NODE_MEMORY)
            # A node that declares one GPU and no CPU: only a device asking for a GPU (and no
            # CPU) fits there. Ray accounts a declared GPU as it does a real one.
            made.gpu_node = made.add_node(  # type: ignore[attr-defined]
                num_cpus=0, num_gpus=1, object_store_memory=NODE_MEMORY
            )
            made.wait_for_nodes(timeout=120 * SCALE)
        except Exception as exc:  # no Ray on this machine (ports, shared memory, ...)
            pytest.skip(f"a Ray cluster cannot start here: {exc}")
        yield made
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if made is not None:
            made.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _text(address: str, rounds: int, eval_every: int, extra: str = "", count: int = 3) -> str:
    devices = "".join(
        f'[[devices]]\nid = "dev{i}"\ntoken = "tok-{i}"\nlaunch = "ray"\ndevice = "cpu"\n'
        for i in range(count)
    )
    return f"""
[testbed]
name = "ray-fleet"
listen = "127.0.0.1:0"
join_timeout_s = {180.0 * SCALE}
round_timeout_s = {60.0 * SCALE}
patience_s = {90.0 * SCALE}
[training]
dataset = "digits"
rounds = {rounds}
eval_every = {eval_every}
seed = 2
[server]
device = "cpu"
threads = 1
[data]
partition = "dirichlet"
alpha = 0.5
[ray]
address = "{address}"
place_timeout_s = {120.0 * SCALE}
{devices}{extra}"""


def _manifest(address: str, rounds: int = 12, eval_every: int = 6) -> Manifest:
    return parse_manifest(_text(address, rounds, eval_every), source="ray-fleet.toml")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _run(engine: Engine, *also: Any) -> str:
    async def scenario() -> str:
        async with asyncio.timeout(300 * SCALE):
            tasks = [asyncio.ensure_future(a) for a in also]
            try:
                return await engine.run()
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(scenario())


def test_address_local_starts_an_instance_for_the_run(tmp_path: Path) -> None:
    """Runs before the cluster fixture starts: the one Ray instance is the run's own."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the [ray] extra)")
    text = _text("local", rounds=4, eval_every=2).replace('launch = "ray"', 'launch = "local"', 1)
    m = parse_manifest(text, source="ray-fleet.toml")
    assert [d.launch for d in m.devices] == ["local", "ray", "ray"]
    engine = Engine(m, tmp_path / "run", manifest_to_toml(m), f"local-instance-{RUN}")
    assert _run(engine) == "completed", (tmp_path / "run" / "summary.json").read_text()
    assert not ray.is_initialized()  # the run left its instance
    placed = [e for e in _jsonl(tmp_path / "run" / "events.jsonl") if e["event"] == "placed"]
    assert sorted(e["device"] for e in placed) == ["dev1", "dev2"]


def test_a_run_placed_across_the_nodes_equals_simulate(cluster: Any, tmp_path: Path) -> None:
    m = _manifest(cluster.address)
    for side in ("simulate", "ray"):
        engine = Engine(
            m, tmp_path / side, manifest_to_toml(m), f"eq-{RUN}", in_process=side != "ray"
        )
        assert _run(engine) == "completed", (tmp_path / side / "summary.json").read_text()
    ref, dist = (_jsonl(tmp_path / side / "metrics.jsonl") for side in ("simulate", "ray"))
    assert [r["round"] for r in dist] == [r["round"] for r in ref] == [6, 12]
    for a, b in zip(ref, dist):
        assert max(abs(a[k] - b[k]) for k in METRICS) <= TOL, (a, b)
    assert ref[-1]["acc_mean"] > 0.5
    placed = [
        d for d in _jsonl(tmp_path / "ray" / "devices.jsonl") if d.get("source") == "placement"
    ]
    assert sorted(d["device"] for d in placed) == ["dev0", "dev1", "dev2"]
    assert len({d["node_id"] for d in placed}) == 2, placed  # both nodes hold agents
    events = _jsonl(tmp_path / "ray" / "events.jsonl")
    assert {e["device"] for e in events if e["event"] == "placed"} == {"dev0", "dev1", "dev2"}
    assert "placed:" in (tmp_path / "ray" / "agents" / "dev0.log").read_text()
    # The dashboard's host column, folded from the records as `watch` does, names the node.
    fold = RunFold(m, str(tmp_path / "ray"))
    read_records(tmp_path / "ray", fold)
    nodes = {d["device"]: d for d in placed}
    for view in fold.snapshot(0.0).devices:
        where = nodes[view.id]
        assert view.node == f"{where['node_ip']}/{where['node_id'][:8]}"
        assert view.node in render_host(view)


def test_ray_client_address_places_the_fleet(cluster: Any, tmp_path: Path) -> None:
    """``address = "ray://HOST:PORT"``: the orchestrator joins through Ray Client, as from a
    machine outside the cluster, and the run equals the one placed through the GCS address."""
    pytest.importorskip("grpc", reason="Ray Client needs grpcio (ray[client])")
    port = cluster.client_port
    m = _manifest(f"ray://127.0.0.1:{port}", rounds=4, eval_every=2)
    ref = _manifest(cluster.address, rounds=4, eval_every=2)
    for side, man in (("client", m), ("gcs", ref)):
        engine = Engine(man, tmp_path / side, manifest_to_toml(man), f"{side}-{RUN}")
        assert _run(engine) == "completed", (tmp_path / side / "summary.json").read_text()
    a, b = (_jsonl(tmp_path / side / "metrics.jsonl") for side in ("client", "gcs"))
    assert [r["round"] for r in a] == [r["round"] for r in b] == [2, 4]
    for x, y in zip(a, b):
        assert max(abs(x[k] - y[k]) for k in METRICS) <= TOL, (x, y)
    placed = [e for e in _jsonl(tmp_path / "client" / "events.jsonl") if e["event"] == "placed"]
    assert sorted(e["device"] for e in placed) == ["dev0", "dev1", "dev2"]


def test_num_gpus_places_the_agent_on_a_gpu_node(cluster: Any, tmp_path: Path) -> None:
    """``[devices.ray] num_gpus``: the agent goes to the one node with a GPU and is given it;
    asking for more GPUs than any node has fails the run in one line naming what it asked."""
    gpu = '[[devices]]\nid = "gpu0"\ntoken = "tok-gpu"\nlaunch = "ray"\ndevice = "cpu"\n'
    gpu += "[devices.ray]\nnum_cpus = 0\nnum_gpus = 1\n"
    text = _text(cluster.address, rounds=4, eval_every=2, extra=gpu)
    m = parse_manifest(text, source="ray-fleet.toml")
    engine = Engine(m, tmp_path / "run", manifest_to_toml(m), f"gpu-{RUN}")
    assert _run(engine) == "completed", (tmp_path / "run" / "summary.json").read_text()
    placed = {
        d["device"]: d
        for d in _jsonl(tmp_path / "run" / "devices.jsonl")
        if d.get("source") == "placement"
    }
    assert placed["gpu0"]["node_id"] == cluster.gpu_node.node_id
    assert placed["gpu0"]["gpu_ids"] == ["0"]
    others = [placed[f"dev{i}"] for i in range(3)]
    assert all(d["node_id"] != cluster.gpu_node.node_id and d["gpu_ids"] == [] for d in others)
    assert len(_jsonl(tmp_path / "run" / "rounds.jsonl")) == 4

    # alone in its manifest, so that no other device's placement races the short timeout
    two = _text(cluster.address, rounds=4, eval_every=2, extra=gpu, count=0)
    two = two.replace("num_gpus = 1", "num_gpus = 2").replace(
        f"place_timeout_s = {120.0 * SCALE}", f"place_timeout_s = {5.0 * SCALE}"
    )
    m = parse_manifest(two, source="ray-fleet.toml")
    engine = Engine(m, tmp_path / "two", manifest_to_toml(m), f"gpu2-{RUN}")
    assert _run(engine) == "failed"
    error = json.loads((tmp_path / "two" / "summary.json").read_text())["error"]
    assert "device gpu0: no Ray node started its agent within" in error, error
    assert "num_gpus 2" in error and "\n" not in error, error


def test_a_killed_agent_actor_is_placed_again(cluster: Any, tmp_path: Path) -> None:
    import ray

    m = _manifest(cluster.address, rounds=24, eval_every=8)
    engine = Engine(m, tmp_path / "run", manifest_to_toml(m), f"kill-{RUN}")

    async def kill() -> None:
        while engine.state.round < 10:  # past the checkpoint of round 8; bounded by _run
            await asyncio.sleep(0.05)
        assert engine.ray_fleet is not None
        ray.kill(engine.ray_fleet.actors["dev1"], no_restart=True)

    assert _run(engine, kill()) == "completed", (tmp_path / "run" / "summary.json").read_text()
    events = [e for e in _jsonl(tmp_path / "run" / "events.jsonl") if e.get("device") == "dev1"]
    kinds = [e["event"] for e in events]
    assert kinds.count("placed") == 2, kinds
    exited = next(e for e in events if e["event"] == "agent_exited")
    assert exited["code"] == -signal.SIGKILL
    assert kinds.index("agent_exited") < kinds.index("respawned") < len(kinds) - 1
    rounds = _jsonl(tmp_path / "run" / "rounds.jsonl")
    assert len(rounds) == 24 and "dev1" in rounds[-1]["participants"]


def _alive_actors(address: str, namespace: str, names: set[str]) -> list[str]:
    """The run's actors the cluster does not hold dead: by name in its namespace, and in the
    GCS's actor table (dead ones included, so the check sees the actors it is about)."""
    import ray

    ray.init(address=address, namespace="gapsl-test-inspect", log_to_driver=False)
    try:
        named = ray.util.list_named_actors(all_namespaces=True)
        from ray._private import state

        ours = [
            a
            for a in state.actors().values()
            if a["ActorClassName"].endswith("AgentHost") and a["Name"] in names
        ]
        assert ours, "the actor table holds none of the run's actors"
        alive = [a["Name"] for a in ours if a["State"] != "DEAD"]
        return alive + [a["name"] for a in named if a.get("namespace") == namespace]
    finally:
        ray.shutdown()


def test_ctrl_c_leaves_no_actor_alive(cluster: Any, tmp_path: Path) -> None:
    manifest = tmp_path / "ray-fleet.toml"
    manifest.write_text(_text(cluster.address, rounds=500, eval_every=50), encoding="utf-8")
    manifest.chmod(0o600)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "orchestrator", "run", str(manifest), "--no-dashboard"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "orchestrator.log", "wb")
    proc = subprocess.Popen([*cmd, "--run-dir", str(run)], env=env, stdout=log, stderr=log)
    try:
        deadline = 240 * SCALE
        while True:  # training has begun: every agent placed and at work
            events = _jsonl(run / "events.jsonl") if (run / "events.jsonl").exists() else []
            if any(e["event"] == "round_started" and e.get("round", 0) >= 2 for e in events):
                break
            assert proc.poll() is None, (tmp_path / "orchestrator.log").read_text()[-3000:]
            deadline -= 0.2
            assert deadline > 0, "training did not start"
            time.sleep(0.2)  # the records are the orchestrator's word on its progress
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120 * SCALE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert code == 130, (tmp_path / "orchestrator.log").read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    namespace = f"gapsl-{summary['run_id']}"
    events = _jsonl(run / "events.jsonl")
    placed = [e for e in events if e["event"] == "placed"]
    assert {e["namespace"] for e in placed} == {namespace} and len(placed) == 3
    assert _alive_actors(cluster.address, namespace, {e["actor"] for e in placed}) == []
