"""Ray-placed agents: devices with ``launch = "ray"`` run their agent on a Ray cluster's nodes.

Ray places each agent's actor (``orchestrator.fleet.ray_actor``) on a node that has the CPUs,
GPUs and memory the device asks for (``[ray]``, ``[devices.ray]``), and tells us when one dies;
the agent then dials back over WebSockets like any device. Actors are named ``<device>.<n>`` in
the run's own namespace (``gapsl-<run id>``), so leftovers of a run can be found by name; they
are killed when the run ends, fails or is interrupted, and Ray kills them too when this process
(their owner) dies. Connecting is bounded (``ray.connect_timeout_s``), and every failure the
user can fix (no Ray, no cluster, an orchestrator the cluster cannot reach) is a
``ManifestError`` naming the key, so ``run`` says it in one line and exits 2.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from orchestrator.config.manifest import DeviceConfig, Manifest
from orchestrator.errors import ManifestError, RunError
from orchestrator.fleet.launcher import STOP_GRACE_S, agent_command, log_tail
from orchestrator.fleet.ray_actor import AgentHost

# A dead actor (ray.kill, its worker SIGKILLed, its node lost) reads as a SIGKILLed agent: not
# the agent's own doing, so the engine starts it again as it does a killed local agent.
ACTOR_DIED = -int(signal.SIGKILL)
_WILDCARD = ("", "0.0.0.0", "::")


def namespace_of(run_id: str) -> str:
    """The Ray namespace of one run's actors (a resumed run keeps its run id, so its name)."""
    return f"gapsl-{run_id}"


def _ray_key(m: Manifest) -> str:
    first = next(d for d in m.devices if d.launch == "ray")
    return f"devices.{first.id}.launch"


def import_ray(m: Manifest) -> Any:
    """The ``ray`` module; a ManifestError naming the first Ray device when it is missing."""
    try:
        import ray  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        problem = '"ray" needs Ray on this machine: pip install "gapsl-testbed[ray]"'
        raise ManifestError(m.source, _ray_key(m), problem) from exc
    return ray


def _probe(address: str, timeout_s: float) -> None:
    """A plain TCP connect to the head first: an unreachable cluster fails in seconds, with
    the reason, instead of Ray's own retries."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout_s, 10.0)):
        pass


def check_reachable(m: Manifest) -> None:
    """Ray installed and the head answering (a TCP connect): a preflight, before anything
    starts; :func:`connect` joins the cluster later."""
    import_ray(m)
    try:
        _probe(m.ray.address, m.ray.connect_timeout_s)
    except (OSError, ValueError) as exc:
        raise ManifestError(
            m.source, "ray.address", f"no Ray cluster at {m.ray.address}: {exc}"
        ) from exc


def connect(m: Manifest, namespace: str) -> None:
    """Connect this process to ``ray.address`` in ``namespace`` (reusing a connection already
    there), then check that the cluster can reach ``testbed.listen``. Blocking."""
    ray, cfg = import_ray(m), m.ray
    if ray.is_initialized():
        if ray.get_runtime_context().namespace == namespace:
            return
        ray.shutdown()
    check_reachable(m)
    failure: list[BaseException] = []

    def init() -> None:
        try:  # the agents' output stays in their logs, not on the orchestrator's terminal
            kwargs: dict[str, Any] = {"namespace": namespace, "log_to_driver": False}
            kwargs["logging_level"] = logging.WARNING  # Ray's INFO lines would cross the dashboard
            if cfg.address == "local":
                kwargs["include_dashboard"] = False
            ray.init(address=cfg.address, **kwargs)
        except BaseException as exc:  # reported by the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=init, name="ray-connect", daemon=True)
    if cfg.address == "local":  # starting an instance is Ray's own, bounded, work; it needs
        init()  # the caller's thread (the main one, in `run`) to set up its processes
    else:
        thread.start()
        thread.join(cfg.connect_timeout_s)
    if thread.is_alive():
        why = f"no answer from the Ray cluster at {cfg.address} within {cfg.connect_timeout_s} s"
        raise ManifestError(m.source, "ray.address", why)
    if failure:
        first = (str(failure[0]).strip().splitlines() or [type(failure[0]).__name__])[0]
        raise ManifestError(m.source, "ray.address", f"cannot join {cfg.address}: {first}")
    check_listen(m, ray)


def _local_addresses() -> set[str]:
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}


def check_listen(m: Manifest, ray: Any) -> None:
    """A loopback ``testbed.listen`` is reachable only from this machine: refuse it when the
    cluster has nodes elsewhere."""
    host, _ = m.listen_host_port()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return
    ips = {str(n.get("NodeManagerAddress")) for n in ray.nodes() if n.get("Alive")}
    elsewhere = sorted(ips - _local_addresses())
    if elsewhere:
        problem = (
            f"is {m.testbed.listen}, which the Ray nodes on {', '.join(elsewhere)} cannot "
            'reach: listen on "0.0.0.0:PORT" or an address of this machine they reach'
        )
        raise ManifestError(m.source, "testbed.listen", problem)


def dial_host(m: Manifest, ray: Any) -> str:
    """The host placed agents dial: ``ray.dial_host``, else the listen host, else (wildcard)
    the address Ray knows this machine by."""
    host = m.ray.dial_host or m.listen_host_port()[0]
    if host in _WILDCARD:
        host = str(ray.util.get_node_ip_address())
    return f"[{host}]" if ":" in host else host


class RayFleet:
    """Places, watches, respawns and always kills a run's Ray-placed agents.

    ``on_exit(device, code)`` is called when an agent ends (``ACTOR_DIED`` for a dead actor),
    ``on_placed(device, fields)`` when its actor has started on a node.
    """

    def __init__(
        self,
        m: Manifest,
        log_dir: Path,
        namespace: str,
        on_exit: Callable[[str, int], None],
        on_placed: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.m, self.log_dir, self.namespace = m, log_dir, namespace
        self.on_exit, self.on_placed = on_exit, on_placed
        self.ray = import_ray(m)
        self.actors: dict[str, Any] = {}  # device -> its current actor
        self._all: list[Any] = []  # every actor this fleet made: all are killed at the end
        self._argv: dict[str, list[str]] = {}
        self._devices: dict[str, DeviceConfig] = {}
        self._nodes: dict[str, str] = {}  # device -> the node its last actor ran on
        self._attempts: dict[str, int] = {}
        self._watchers: list[asyncio.Task[None]] = []
        self._watch_of: dict[str, asyncio.Task[None]] = {}  # device -> its current watcher
        self._ca_pem = ""
        self.stopping = False

    async def start(self, devices: list[DeviceConfig], scheme: str, port: int) -> None:
        """Place every device's agent (concurrently); a RunError if one cannot be placed
        within ``ray.place_timeout_s``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._cls = self.ray.remote(AgentHost)
        url = f"{scheme}://{dial_host(self.m, self.ray)}:{port}"
        tls = self.m.tls_files()
        if tls is not None and tls.ca is not None:  # the nodes need not share our folders
            self._ca_pem = tls.ca.read_text(encoding="utf-8")
        for d in devices:
            cmd = agent_command(d, url, None, self.m.data_dir(), self.m.data.download)
            self._argv[d.id], self._devices[d.id] = cmd[3:], d  # after "python -m edge_agent"
        await asyncio.gather(*(self._launch(d.id) for d in devices))

    def _options(self, device_id: str, name: str) -> dict[str, Any]:
        r = self._devices[device_id].ray
        opts: dict[str, Any] = {"name": name, "namespace": self.namespace, "max_restarts": 0}
        opts.update(num_cpus=r.num_cpus, num_gpus=r.num_gpus)
        if r.memory_mb:
            opts["memory"] = r.memory_mb * 2**20
        if r.node_ip:  # every node offers a tiny amount of the resource "node:<its ip>"
            opts["resources"] = {f"node:{r.node_ip}": 0.001}
        elif device_id in self._nodes:  # a respawn: its checkpoint is on that node, if alive
            from ray.util.scheduling_strategies import (  # type: ignore[import-not-found, unused-ignore]
                NodeAffinitySchedulingStrategy,
            )

            node = self._nodes[device_id]
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        return opts

    async def _launch(self, device_id: str) -> None:
        attempt = self._attempts[device_id] = self._attempts.get(device_id, 0) + 1
        name = f"{device_id}.{attempt}"
        actor = self._cls.options(**self._options(device_id, name)).remote(
            device_id, self.namespace
        )
        self._all.append(actor)
        self.actors[device_id] = actor
        timeout_s = self.m.ray.place_timeout_s
        try:
            where = await asyncio.wait_for(_wait(actor.where.remote()), timeout_s)
        except asyncio.TimeoutError:
            self._kill(actor)
            r = self._devices[device_id].ray
            raise RunError(
                f"device {device_id}: no Ray node started its agent within {timeout_s} s "
                f"(it asks for num_cpus {r.num_cpus}, num_gpus {r.num_gpus}, memory_mb "
                f"{r.memory_mb}{', node_ip ' + r.node_ip if r.node_ip else ''})"
            ) from None
        self._nodes[device_id] = str(where["node_id"])
        fields = {**where, "actor": name, "namespace": self.namespace, "attempt": attempt}
        self.on_placed(device_id, fields)
        with open(self.log_dir / f"{device_id}.log", "a", encoding="utf-8") as log:
            shown = " ".join(f"{k}={v}" for k, v in fields.items())
            log.write(
                f"# placed: {shown}\n# args: python -m edge_agent {' '.join(self._argv[device_id])}\n"
            )
        threads = max(1, int(self._devices[device_id].ray.num_cpus))
        ref = actor.run.remote(
            self._argv[device_id], self._devices[device_id].token, self._ca_pem, threads
        )
        task = asyncio.create_task(self._watch(device_id, actor, ref), name=f"watch-{name}")
        self._watchers.append(task)
        self._watch_of[device_id] = task

    async def respawn(self, device_id: str) -> None:
        """Place the device's agent again (on the same node if it can); it resumes from the
        checkpoint it left there."""
        if not self.stopping and device_id in self._argv:
            await self._launch(device_id)

    async def _watch(self, device_id: str, actor: Any, ref: Any) -> None:
        try:
            code, tail = await _wait(ref)
            note = f"# agent exited with code {code}; its output on the node ends with:\n{tail}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # RayActorError and kin: the actor or its node is gone
            code = ACTOR_DIED
            note = f"# actor died: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
        self._kill(actor)  # an actor whose agent ended still holds its node's resources
        with open(self.log_dir / f"{device_id}.log", "a", encoding="utf-8") as log:
            log.write(note.rstrip() + "\n")
        self.on_exit(device_id, code)

    def log_tail(self, device_id: str, lines: int = 5) -> str:
        return log_tail(self.log_dir / f"{device_id}.log", lines)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """After the run's bye, give the agents ``grace_s`` to leave, ask the rest to stop,
        then kill every actor and leave the cluster. Bounded; cancelled part-way, it still
        kills the actors."""
        self.stopping = True
        try:
            running = [w for w in self._watchers if not w.done()]
            if running:
                await asyncio.wait(running, timeout=grace_s)
            late = [self.actors[d] for d, w in self._watch_of.items() if not w.done()]
            stops = [asyncio.ensure_future(_wait(a.stop.remote())) for a in late]
            if stops:
                _, slow = await asyncio.wait(stops, timeout=STOP_GRACE_S)
                for s in slow:  # the actors are killed below: nothing waits for these
                    s.cancel()
        finally:
            self.close()
            for w in self._watchers:
                w.cancel()
            await asyncio.gather(*self._watchers, return_exceptions=True)

    def close(self) -> None:
        """Kill every actor of the run and disconnect from the cluster (idempotent)."""
        self.stopping = True
        for actor in self._all:
            self._kill(actor)
        self._all.clear()
        if self.ray.is_initialized():
            self.ray.shutdown()

    def _kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already dead, or the cluster is gone: nothing left to kill
            pass


async def _wait(ref: Any) -> Any:
    """An ObjectRef's value, awaited without blocking the event loop."""
    return await asyncio.wrap_future(ref.future())
