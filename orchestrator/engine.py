"""The distributed engine: serve the fleet, run synchronous PSL rounds, evaluate, record.

One run: prepare the job (data, partition, identical initial weights), listen, start the local
fleet, wait for every device to hold the job, then per round ask every device for activations,
update the shared server partition once, and send each device its activation gradient.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from pathlib import Path
from typing import Any, Callable

import torch

from edge_agent import protocol
from edge_agent.agent import AgentExit
from edge_agent.data import Dataset
from edge_agent.protocol import encode
from orchestrator.algorithms.base import POOLED_ID
from orchestrator.algorithms.dispatch import rule_class
from orchestrator.config import secrets
from orchestrator.config.manifest import Manifest
from orchestrator.errors import GapslError, RunError, RunInterrupted
from orchestrator.fleet.admission import Admission
from orchestrator.fleet.gate import guards, raise_fd_limit
from orchestrator.fleet.group import SessionGroup
from orchestrator.fleet.launcher import LocalFleet, dial_host
from orchestrator.fleet.listen import listener
from orchestrator.fleet.netns import kernel_links
from orchestrator.fleet.rayfleet import RayFleet
from orchestrator.fleet.sessions import DeviceSession, wait_ready
from orchestrator.fleet.tls import server_ssl_context
from orchestrator.heap import long_lived_frozen
from orchestrator.names import DeviceStatus
from orchestrator.preflight import bind_problem
from orchestrator.records import checkpoint
from orchestrator.records.reader import last_rounds
from orchestrator.records.summary import run_summary
from orchestrator.records.writer import RunRecords
from orchestrator.training.job import Job, job_message, prepare_job
from orchestrator.training.loop import Runner
from orchestrator.training.state import RunState
from orchestrator.ui.fold import STOP_MESSAGE, RunFold
from orchestrator.ui.prometheus import MetricsServer, require_metrics, start_metrics
from orchestrator.ui.snapshot import RunSnapshot
from orchestrator.ui.watch import read_records

WAITING_EVERY_S = 10.0  # while devices are missing, how often a `waiting` event says who
BYE_WAIT_S = 5.0  # how long a device told `bye` may take to close before we close it


class Engine:
    """Runs one manifest on the fleet and writes its run directory."""

    def __init__(
        self,
        m: Manifest,
        run_dir: Path,
        manifest_toml: str,
        run_id: str,
        in_process: bool = False,
        resume: dict[str, Any] | None = None,
        elapsed_s: float = 0.0,
        dataset: Dataset | None = None,
    ) -> None:
        self.m = m
        self.dataset = dataset  # loaded by the preflights already, or None: load it here
        self.resume = resume  # the checkpoint a resumed run continues from
        self.elapsed_before = elapsed_s  # wall time of the run before it was interrupted
        self.in_process = in_process  # the reference engine: devices in this process, no network
        self.run_id = run_id
        require_metrics(m)  # before the run directory exists: a manifest error, exit 2
        self.records = RunRecords(run_dir, manifest_toml)
        self.records.started -= elapsed_s  # a resumed run's record times carry on
        self.state = RunState(self.records, "")  # the address is known once it is bound
        # What the dashboard shows: the fold of the records, those already there (a resumed
        # run's) and each one written from now on, exactly as `watch` folds the files.
        self.fold = RunFold(m, str(self.records.dir))
        read_records(self.records.dir, self.fold)
        self.records.subscribe(self.fold.add)
        self.sessions = {d.id: DeviceSession(d, rank) for rank, d in enumerate(m.devices)}
        self.fleet: LocalFleet | None = None
        self.ray_fleet: RayFleet | None = None  # launch = "ray" devices' agents
        self.job: Job | None = None
        self._frames: dict[str, bytes] = {}
        self._respawns: dict[str, int] = {}
        self.runner: Runner | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.metrics: MetricsServer | None = None  # testbed.metrics_listen's endpoint

    # --- the run ------------------------------------------------------------------------------

    async def run(self, on_listening: Callable[[str], None] | None = None) -> str:
        """Run to the end; returns the final status. Cancelling marks the run interrupted."""
        m, st = self.m, self.state
        started = time.monotonic()
        status, error = "failed", ""
        admission: Admission | None = None
        try:
            kind = "in-process" if self.in_process else "fleet"  # the dashboard names it
            fields = {"dataset": m.training.dataset, "devices": len(m.devices), "engine": kind}
            st.event("preparing", None, fields)
            self.metrics = start_metrics(m, self.records)
            exposed = None if self.in_process else secrets.exposed_warning(m)
            if exposed is not None:  # once per run: the records and the dashboard both say it
                st.event("tokens_exposed", None, {"why": exposed})
            # A bad certificate or key fails the run before the data is loaded.
            tls = None if self.in_process else m.tls_files()
            ssl_context = server_ssl_context(tls.cert, tls.key) if tls is not None else None
            scheme = "ws" if ssl_context is None else "wss"
            threads = m.server.threads or (1 if any(d.launch == "local" for d in m.devices) else 0)
            if threads:  # the same in simulate, so both engines sum in the same order
                torch.set_num_threads(threads)
            self.job = await asyncio.to_thread(prepare_job, m, self.dataset)
            if self.in_process:
                await self._train_in_process()
                status = "completed"
                return status
            if rule_class(m.training.algorithm).simulate_only:
                raise RunError(
                    f"training.algorithm = {m.training.algorithm!r} runs only with simulate"
                )
            resume_round = int(self.resume["round"]) if self.resume else 0
            clients = self.resume["clients"] if self.resume else {}
            self._frames = {
                s.id: job_message(
                    m,
                    self.job,
                    self.run_id,
                    s.rank,
                    resume_round,
                    checkpoint.tensors_to_weights(clients[s.id]) if s.id in clients else None,
                )
                for s in self.sessions.values()
            }
            tb = m.testbed
            raised = raise_fd_limit()  # every pending connection holds a descriptor
            if raised is not None:
                st.event("fd_limit", None, {"soft_was": raised[0], "soft": raised[1]})
            refusals, gate = guards(tb, st.event)  # the pending cap, penalties, the summaries
            admission = Admission(
                self.sessions,
                self.run_id,
                lambda s: self._frames[s.id],
                st.event,
                self._telemetry,
                gate=gate,
                refusals=refusals,
                hello_timeout_s=tb.hello_timeout_s,
            )
            host, port = m.listen_host_port()
            listen = functools.partial(listener, m, admission, gate, ssl_context)
            async with contextlib.AsyncExitStack() as stack:
                try:
                    server = await stack.enter_async_context(listen(host, port))
                except OSError as exc:  # taken since the preflight bound it: a failed run, named
                    raise m.error("testbed.listen", bind_problem(exc, host, port)) from exc
                port = server.sockets[0].getsockname()[1]
                st.listen = f"{host}:{port}"
                st.event("listening", None, {"url": f"{scheme}://{st.listen}"})
                if on_listening is not None:
                    on_listening(st.listen)
                try:
                    url = f"{scheme}://{dial_host(host)}:{port}"
                    await self._start_fleet(url, stack, lambda hosts: listen(hosts, port))
                    await self._start_ray_fleet(scheme, port)
                    with long_lived_frozen() as freeze:  # torch, the data, the job frames
                        await self._train(freeze)
                    status = "completed"
                except (RunInterrupted, asyncio.CancelledError):
                    status = "interrupted"
                    raise
                finally:
                    admission.closing = True
                    refusals.close()
                    if status == "interrupted":  # devices keep their state and dial again
                        await self._say_bye("interrupted; the run can be resumed", redial=True)
                    else:
                        await self._say_bye("completed" if status == "completed" else "run ended")
                    # a respawn still starting must finish before the fleet is stopped
                    await asyncio.gather(*self._background, return_exceptions=True)
                    if self.fleet is not None:
                        await self.fleet.stop()
                    if self.ray_fleet is not None:
                        await self.ray_fleet.stop()
        except asyncio.CancelledError:
            status, error = "interrupted", "interrupted by signal"
            raise
        except RunInterrupted as exc:
            status, error = "interrupted", str(exc)
        except GapslError as exc:
            error = str(exc)
        except Exception as exc:  # an unexpected crash still leaves a summary behind
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if self.ray_fleet is not None:  # even when cancelled mid-stop: no actor outlives us
                self.ray_fleet.close()
            wall_s = self.elapsed_before + time.monotonic() - started
            st.finish(status, error, wall_s)
            self._write_summary(status, error, wall_s)
            if self.metrics is not None:
                self.metrics.close()
            self.records.close()
        return status

    async def _start_fleet(self, url: str, stack: contextlib.AsyncExitStack, listen: Any) -> None:
        local = [s.cfg for s in self.sessions.values() if s.cfg.launch == "local"]
        if not local:
            return
        # the namespaces go when the stack unwinds: after the agents stopped, whatever ended it
        wires = await kernel_links(self.m, self.run_id, stack, listen, self.state.event)
        self.fleet = LocalFleet(self.records.dir / "agents", self._agent_exited)
        tls = self.m.tls_files()
        ca_file = tls.ca if tls is not None else None
        m = self.m
        await self.fleet.start(local, url, m.data_dir(), m.data.download, ca_file, wires)
        self.state.event("fleet_started", None, {"local_agents": len(local)})

    async def _start_ray_fleet(self, scheme: str, port: int) -> None:
        placed = [s.cfg for s in self.sessions.values() if s.cfg.launch == "ray"]
        if not placed:
            return
        from orchestrator.fleet import rayfleet

        namespace = rayfleet.namespace_of(self.run_id)
        if self.m.ray.address == "local":  # Ray starts an instance only from this thread
            rayfleet.connect(self.m, namespace)
        else:
            await asyncio.to_thread(rayfleet.connect, self.m, namespace)
        log_dir = self.records.dir / "agents"
        self.ray_fleet = RayFleet(self.m, log_dir, namespace, self._agent_exited, self._placed)
        await self.ray_fleet.start(placed, scheme, port)
        self.state.event("fleet_started", None, {"ray_agents": len(placed)})

    def _placed(self, device_id: str, where: dict[str, Any]) -> None:
        """A Ray-placed agent's node: in the event log (the dashboard's host column) and in
        devices.jsonl."""
        self.state.event("placed", device_id, where)
        node = {k: where.get(k) for k in ("node_ip", "node_id", "node_hostname", "gpu_ids")}
        record = {"t": round(self.records.elapsed(), 3), "device": device_id}
        self.records.append("devices", {**record, "source": "placement", **node})

    def _agent_exited(self, device_id: str, code: int) -> None:
        session = self.sessions[device_id]
        self.state.event("agent_exited", device_id, {"code": code})
        fleet = self.ray_fleet if session.cfg.launch == "ray" else self.fleet
        stopping = fleet is not None and fleet.stopping
        if code == 0 or stopping or self.state.phase in ("completed", "failed", "interrupted"):
            return
        # Killed or crashed by something outside the job: start it again; it resumes from its
        # local checkpoint. A job it cannot do, a bad command line or a refusal would only repeat.
        fatal = code in (AgentExit.FAILED, AgentExit.USAGE, AgentExit.REFUSED)
        used = self._respawns.get(device_id, 0)
        if not fatal and used < self.m.testbed.respawn_local and fleet is not None:
            self._respawns[device_id] = used + 1
            self.state.event("respawned", device_id, {"code": code, "attempt": used + 1})
            task = asyncio.get_running_loop().create_task(fleet.respawn(device_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        if fatal:
            tail = fleet.log_tail(device_id, 3) if fleet else ""
            session.fail(f"{session.cfg.launch} agent exited with code {code}: {tail}")
            return
        # Out of respawns (or respawn_local = 0): the device is now like a remote one whose link
        # dropped. Whoever starts its agent again (a lab script, a supervisor, a person) brings
        # it back; until then testbed.patience_s and the lost-device rules decide the run.
        session.status = DeviceStatus.LOST
        fields = {"code": code, "respawns": used, "patience_s": self.m.testbed.patience_s}
        self.state.event("awaiting_return", device_id, fields)

    async def _train_in_process(self) -> None:
        from orchestrator.training.inprocess import InProcessGroup

        assert self.job is not None
        pooled = rule_class(self.m.training.algorithm).pooled
        ids = [POOLED_ID] if pooled else [s.id for s in self.sessions.values()]
        group = InProcessGroup(self.m, self.job, ids)
        for s in self.sessions.values():
            s.status = "joined"
            s.shard_size = len(self.job.shards[0 if pooled else s.rank])
            # No agent says it holds the job here: record what a fleet's "ready" would say.
            trainer = group.trainers[POOLED_ID if pooled else s.id]
            ready = {"shard_size": s.shard_size, "torch_device": trainer.device.type}
            self.state.event("ready", s.id, ready)
        self.state.listen = "in-process"
        await Runner(self.m, self.job, group, self.state).train()
        for s in self.sessions.values():
            s.status = "done"

    async def _train(self, freeze: Callable[[], None]) -> None:
        m, st = self.m, self.state
        sessions = list(self.sessions.values())
        last_tick = [0.0]

        def tick(missing: list[str]) -> None:
            now = time.monotonic()
            if now - last_tick[0] >= WAITING_EVERY_S:
                last_tick[0] = now
                st.event("waiting", None, {"missing": ",".join(missing)})

        # The dashboard counts down to the join timeout from this event's time.
        st.event("joining", None, {"timeout_s": m.testbed.join_timeout_s})
        await wait_ready(sessions, m.testbed.join_timeout_s, tick)
        assert self.job is not None
        group = SessionGroup(
            sessions,
            m.testbed.round_timeout_s,
            self.job.dataset.num_classes,
            m.training.compression,
            patience_s=m.testbed.patience_s,
            lost_timeout_s=m.testbed.lost_timeout_s,
            on_event=st.event,
        )
        runner = Runner(m, self.job, group, st)
        runner.checkpoint_dir = self.records.dir
        runner.run_id = self.run_id
        self.runner = runner
        if self.resume is not None:
            runner.load_state_dict(self.resume)
            st.round = runner.start_round - 1
            # Rounds past the checkpoint that the records already hold (an orchestrator killed
            # between checkpoints) are recorded again, each copy marked as a repeat.
            runner.recorder.held = last_rounds(self.records.dir)
            recorded = runner.recorder.held["rounds"]
            st.event("resumed", None, {"round": st.round, "recorded_round": recorded})
        freeze()  # the fleet's sessions too: no full collection walks them every round
        await runner.train()

    # --- bookkeeping --------------------------------------------------------------------------

    def _telemetry(self, session: DeviceSession) -> None:
        record = {"t": round(self.records.elapsed(), 3), "device": session.id}
        runner = self.runner
        profile = runner.planner.profiles.get(session.id) if runner is not None else None
        if profile is not None:
            record.update(profile.record())
        else:
            measured = runner.recorder.compute_ms if runner is not None else {}
            record["compute_ms_per_sample"] = measured.get(session.id)
            record["rtt_ms"] = session.ping_ms()
            record["uplink_mbps"] = None
            record["downlink_mbps"] = None
        record.update(
            {k: session.stats.get(k) for k in ("cpu_percent", "mem_percent", "rss_bytes", "temp_c")}
        )
        self.records.append("devices", record)

    def snapshot(self) -> RunSnapshot:
        """What the dashboard shows now: the fold of every record written so far."""
        return self.fold.snapshot(self.records.elapsed())

    def request_stop(self) -> None:
        """Stop at the next round boundary, after a checkpoint (the first SIGINT/SIGTERM)."""
        if not self.state.stop_requested:
            self.state.stop_requested = True
            self.state.message = STOP_MESSAGE
            self.state.event("stopping", None, {"round": self.state.round})

    async def _say_bye(self, reason: str, redial: bool = False) -> None:
        frame = encode("bye", reason=reason, redial=redial or None)
        plain = encode("bye", reason=reason)  # local agents are stopped; a resume starts new ones
        for s in self.sessions.values():
            await s.send(plain if s.cfg.launch != "remote" else frame)
            s.status = "done" if s.ws is not None else s.status
        for s in self.sessions.values():
            ws = s.ws
            if ws is not None:
                try:
                    await asyncio.wait_for(ws.wait_closed(), BYE_WAIT_S)
                except asyncio.TimeoutError:
                    await ws.close(protocol.CLOSE_GOING_AWAY, "run over")

    def _write_summary(self, status: str, error: str, wall_s: float) -> None:
        done = self.state.round if status != "completed" else self.m.training.rounds
        cp = self.runner.checkpointed_round if self.runner else None
        ids = [s.id for s in self.sessions.values()]
        last = self.fold.last_eval
        self.records.write_summary(
            run_summary(self.m, status, done, cp, last, wall_s, ids, self.run_id, error)
        )
