"""The run's mutable state: what the engine updates and the dashboard snapshots.

Every event also goes to ``events.jsonl`` and, in headless mode, to one log line on stdout.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from orchestrator.config.manifest import Manifest
from orchestrator.fleet.sessions import DeviceSession
from orchestrator.records.writer import RunRecords
from orchestrator.ui.snapshot import (
    DeviceView,
    EvalPoint,
    EventLine,
    GapslView,
    RoundPoint,
    RunSnapshot,
)


class RunState:
    def __init__(self, manifest: Manifest, records: RunRecords, listen: str) -> None:
        self.m = manifest
        self.records = records
        self.listen = listen
        self.phase = "waiting"
        self.round = 0
        self.message = ""
        self.stop_requested = False  # SIGINT/SIGTERM: stop at the next round boundary
        self.sessions: list[DeviceSession] = []
        self.evals: list[EvalPoint] = []
        self.rounds: collections.deque[RoundPoint] = collections.deque(maxlen=200)
        self.events: collections.deque[EventLine] = collections.deque(maxlen=50)
        self.device_acc: dict[str, float] = {}
        self.device_loss: dict[str, float] = {}
        self.device_rounds: dict[str, int] = {}
        self.compute_ms: dict[str, float] = {}
        self.round_started: float | None = None
        self.gapsl: GapslView | None = None
        self.device_batch: dict[str, int] = {}
        self.profiles: dict[str, Any] = {}  # measured DeviceProfile per device
        self.on_line: Callable[[str], None] | None = None  # headless printer

    def event(
        self, event: str, device: str | None = None, fields: dict[str, Any] | None = None
    ) -> None:
        fields = dict(fields or {})
        rec = self.records.event(event, device, **fields)
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        line = EventLine(t=rec["t"], event=event, device=device, text=text)
        self.events.append(line)
        if self.on_line is not None:
            from orchestrator.ui.render import format_event

            self.on_line(format_event(line))

    def add_eval(self, point: EvalPoint) -> None:
        self.evals.append(point)
        if self.on_line is not None:
            from orchestrator.ui.render import format_eval

            self.on_line(format_eval(point, self.m.training.rounds))

    def eta_s(self) -> float | None:
        if self.round == 0 or self.round_started is None:
            return None
        spent = self.records.elapsed() - self.round_started
        return spent / self.round * (self.m.training.rounds - self.round)

    def snapshot(self) -> RunSnapshot:
        devices = []
        for s in self.sessions:
            stats, facts = s.stats, s.facts
            devices.append(
                DeviceView(
                    id=s.id,
                    status=s.status,
                    launch=s.cfg.launch,
                    hostname=str(facts.get("hostname", "")),
                    platform=str(facts.get("platform", "")),
                    torch_device=str(facts.get("torch_device", "")),
                    cpu_count=int(facts.get("cpu_count", 0) or 0),
                    memory_gib=float(facts.get("memory_bytes", 0) or 0) / 2**30,
                    cpu_percent=stats.get("cpu_percent"),
                    mem_percent=stats.get("mem_percent"),
                    temp_c=stats.get("temp_c"),
                    compute_ms_per_sample=self.compute_ms.get(s.id),
                    rtt_ms=_profile(self, s.id, "rtt_ms") or latency_ms(s),
                    uplink_mbps=_profile(self, s.id, "uplink_mbps"),
                    downlink_mbps=_profile(self, s.id, "downlink_mbps"),
                    batch_size=self.device_batch.get(s.id, self.m.training.batch_size),
                    shard_size=s.shard_size,
                    rounds_done=self.device_rounds.get(s.id, 0),
                    last_loss=self.device_loss.get(s.id),
                    accuracy=self.device_acc.get(s.id),
                )
            )
        t, d = self.m.training, self.m.data
        return RunSnapshot(
            name=self.m.testbed.name,
            algorithm=t.algorithm,
            dataset=t.dataset,
            partition=d.partition,
            alpha=d.alpha if d.partition == "dirichlet" else None,
            listen=self.listen,
            phase=self.phase,
            round=self.round,
            rounds=t.rounds,
            elapsed_s=self.records.elapsed(),
            eta_s=self.eta_s(),
            devices=tuple(devices),
            evals=tuple(self.evals),
            recent_rounds=tuple(self.rounds),
            events=tuple(self.events),
            gapsl=self.gapsl,
            run_dir=str(self.records.dir),
            message=self.message,
        )


def _profile(state: RunState, device: str, field: str) -> float | None:
    p = state.profiles.get(device)
    value = getattr(p, field, None) if p is not None else None
    return value if isinstance(value, float) and value != float("inf") else None


def latency_ms(session: DeviceSession) -> float | None:
    """The websockets keepalive's last measured ping round trip."""
    ws = session.ws
    latency = getattr(ws, "latency", 0.0) if ws is not None else 0.0
    return latency * 1000.0 if latency else None
