"""Real torch agents placed on a Ray cluster: as many as this machine holds, one orchestrator.

Run ``python -m bench.ray_fleet [--agents 32] [--rounds 20] [--nodes 2]``. A real multi-node
cluster is started here (``ray.cluster_utils.Cluster``: a head and ``--nodes - 1`` workers, each
offering ``--agents`` logical CPUs between them), and a manifest of ``--agents`` devices with
``launch = "ray"`` (``num_cpus`` small enough that all fit) runs PSL on the digits with their
default model in this process's :class:`~orchestrator.engine.Engine`. Every agent is the real
``edge_agent`` with torch, started by its actor with the same command line as a local agent.

Reported: the run's status and rounds, how long placement and the join took (from the
``placed`` and ``ready`` events), mean and median round time, the nodes the agents landed on,
the orchestrator's peak RSS, and the memory of the whole machine before, once the cluster is
up, at the peak and after (psutil), from which the memory per placed agent (its actor, its
agent process and the orchestrator's share) and the number of agents this machine's memory
would hold follow. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

NODE_STORE = 80 * 2**20  # each node's object store: the run puts nothing in it


def manifest_text(address: str, agents: int, rounds: int) -> str:
    text = (
        f'[testbed]\nname = "ray-fleet"\nlisten = "127.0.0.1:0"\njoin_timeout_s = 900.0\n'
        f"round_timeout_s = 300.0\npatience_s = 300.0\n"
        f'[training]\ndataset = "digits"\nalgorithm = "psl"\nrounds = {rounds}\n'
        f"eval_every = 10\nseed = 0\nbatch_size = 16\n"
        f'[server]\ndevice = "cpu"\nthreads = 1\n[data]\npartition = "iid"\n'
        f'[ray]\naddress = "{address}"\nnum_cpus = 1\nplace_timeout_s = 900.0\n'
    )
    for k in range(agents):
        text += f'[[devices]]\nid = "ray-{k:03d}"\ntoken = "tok-{k:03d}"\nlaunch = "ray"\n'
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_fleet", description=__doc__)
    parser.add_argument("--agents", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=2, help="cluster nodes, the head included")
    args = parser.parse_args(argv)
    import psutil
    from ray.cluster_utils import Cluster

    from orchestrator.config.manifest import manifest_to_toml, parse_manifest
    from orchestrator.engine import Engine
    from orchestrator.records.reader import read_jsonl

    nodes = max(args.nodes, 1)
    # Logical CPUs per node, one an agent: they book placement (the agents share this
    # machine's cores) and spread the agents over the nodes.
    cpus = max(1, -(-args.agents // nodes))
    mem_before = psutil.virtual_memory().used
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": cpus, "object_store_memory": NODE_STORE}
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, object_store_memory=NODE_STORE)
    cluster.wait_for_nodes(timeout=300)
    mem_cluster = psutil.virtual_memory().used  # the cluster's own processes are up
    peak = {"machine": 0, "orchestrator": 0}
    done = threading.Event()

    def sample() -> None:  # every 0.5 s: the machine's memory in use, this process's RSS
        me = psutil.Process()
        while not done.wait(0.5):
            peak["machine"] = max(peak["machine"], psutil.virtual_memory().used)
            peak["orchestrator"] = max(peak["orchestrator"], me.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            m = parse_manifest(manifest_text(cluster.address, args.agents, args.rounds))
            status = asyncio.run(Engine(m, run_dir, manifest_to_toml(m), "ray-fleet").run())
            wall = time.monotonic() - started
            events = read_jsonl(run_dir / "events.jsonl")[0]
            rounds = read_jsonl(run_dir / "rounds.jsonl")[0]
            metrics = read_jsonl(run_dir / "metrics.jsonl")[0]
            devices = read_jsonl(run_dir / "devices.jsonl")[0]
    finally:
        done.set()
        sampler.join()
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    mem_after = psutil.virtual_memory().used

    def first(kind: str) -> list[float]:
        return [e["t"] for e in events if e["event"] == kind]

    placed, ready = first("placed"), first("ready")
    steady = [r["round_time_s"] for r in rounds[1:]] or [r["round_time_s"] for r in rounds]
    per_node = collections.Counter(
        d.get("node_id", "?")[:8] for d in devices if d.get("source") == "placement"
    )
    per_agent = (peak["machine"] - mem_cluster) / max(args.agents, 1)
    total = psutil.virtual_memory().total
    summary = {
        "bench": "ray_fleet",
        "agents": args.agents,
        "nodes": nodes,
        "status": status,
        "rounds": len(rounds),
        "placed": len(placed),
        "ready": len(ready),
        "all_placed_s": max(placed, default=None),
        "all_ready_s": max(ready, default=None),
        "mean_round_s": statistics.fmean(steady) if steady else None,
        "median_round_s": statistics.median(steady) if steady else None,
        "final_acc_mean": metrics[-1]["acc_mean"] if metrics else None,
        "agents_per_node": dict(per_node),
        "orchestrator_peak_rss_mib": peak["orchestrator"] / 2**20,
        "machine_used_mib": {
            "before": mem_before / 2**20,
            "cluster_up": mem_cluster / 2**20,
            "peak": peak["machine"] / 2**20,
            "after": mem_after / 2**20,
        },
        "mib_per_agent": per_agent / 2**20,
        "agents_memory_would_hold": int((total - mem_cluster) // per_agent) if per_agent else None,
        "wall_s": wall,
    }
    print(f"{args.agents} real torch agents on {nodes} Ray nodes: {status}, {len(rounds)} rounds; "
          f"all placed {summary['all_placed_s']} s, all ready {summary['all_ready_s']} s; "
          f"median round {summary['median_round_s']} s; {summary['mib_per_agent']:.0f} MiB "
          "per agent")  # fmt: skip
    print(json.dumps(summary))
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
