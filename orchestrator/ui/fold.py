"""The one fold of a run's records into the dashboard's `RunSnapshot`, live and in ``watch``.

The run directory's records are the whole story of a run, so the dashboard shows what they
say and nothing else: the engine subscribes a `RunFold` to its records writer, ``watch`` feeds
one from the files' tails. Each snapshot field comes from one record file, in that file's own
order, so the state does not depend on how records of different files interleave: a tail that
reads ``events.jsonl`` before ``rounds.jsonl`` builds the snapshot the writer's order builds.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config.manifest import Manifest
from orchestrator.names import DeviceStatus, Phase
from orchestrator.records.reader import finite
from orchestrator.records.writer import FINAL_EVENTS
from orchestrator.ui.log_lines import describe, format_eval, format_event, key_values
from orchestrator.ui.snapshot import (
    DeviceView,
    EvalPoint,
    EventLine,
    GapslView,
    RoundPoint,
    RunSnapshot,
)

__all__ = ["HIDDEN_EVENTS", "ROUTINE_EVENTS", "STOP_MESSAGE", "RunFold"]

# The run's progress, which the header shows (phase, round counter): kept out of the event log
# and the headless lines, where one line per round would bury joins, losses and stragglers.
HIDDEN_EVENTS = frozenset({"round_started", "phase"})
# Lines that come back all run long: each run of them is one log line, the latest, with a count,
# so a long run's log keeps its joins and losses (the headless lines still print every one).
ROUTINE_EVENTS = frozenset({"checkpoint", "waiting"})
STOP_MESSAGE = "stopping after this round (again to stop at once)"
_ENDS = {event: Phase(status) for status, event in FINAL_EVENTS.items()}
_JOINED = {"joined", "rejoined", "ready"}
_AT_WORK = (DeviceStatus.JOINED, DeviceStatus.COMPUTING, DeviceStatus.STRAGGLING)
_LINK_KEYS = ("rtt_ms", "uplink_mbps", "downlink_mbps", "cpu_percent", "mem_percent", "temp_c")


def _num(value: Any) -> float:
    """A record's number as a float; null (NaN or inf when written) reads back as NaN."""
    v = finite(value)
    return math.nan if v is None else v


def _phase_of(value: Any) -> Phase | None:
    try:
        return Phase(value)
    except ValueError:
        return None


def _drop_from(points: MutableSequence[Any], r: int) -> None:
    """Forget the points of round ``r`` and later: a resumed run records the rounds past its
    checkpoint again, and the later copy is the run's (as ``records.reader.by_round`` keeps).
    Only the file's own order decides, so a tail of one file folds the same as the writer."""
    while points and points[-1].round >= r:
        points.pop()


def _int(value: Any) -> int:
    v = finite(value)
    return int(v) if v is not None else 0


@dataclass
class _Device:
    """What the records have told of one device so far."""

    launch: str
    status: str = DeviceStatus.WAITING
    facts: dict[str, Any] = field(default_factory=dict)
    link: dict[str, float | None] = field(default_factory=dict)  # latest devices.jsonl values
    probe_ms: float | None = None  # compute per sample, as the probe measured it
    round_ms: float | None = None  # ... and as its last round did (shown once there is one)
    batch_size: int = 0
    shard_size: int = 0
    rounds_done: int = 0
    last_loss: float | None = None
    accuracy: float | None = None
    warning: str = ""

    def view(self, device_id: str) -> DeviceView:
        f = self.facts
        return DeviceView(
            id=device_id,
            status=self.status,
            launch=self.launch,
            hostname=str(f.get("hostname", "")),
            node=str(f.get("node", "")),
            platform=str(f.get("platform", "")),
            torch_device=str(f.get("torch_device", "")),
            cpu_count=_int(f.get("cpu_count")),
            memory_gib=_int(f.get("memory_bytes")) / 2**30,
            compute_ms_per_sample=self.round_ms if self.round_ms is not None else self.probe_ms,
            batch_size=self.batch_size,
            shard_size=self.shard_size,
            rounds_done=self.rounds_done,
            last_loss=self.last_loss,
            accuracy=self.accuracy,
            warning=self.warning,
            cpu_percent=self.link.get("cpu_percent"),
            mem_percent=self.link.get("mem_percent"),
            temp_c=self.link.get("temp_c"),
            rtt_ms=self.link.get("rtt_ms"),
            uplink_mbps=self.link.get("uplink_mbps"),
            downlink_mbps=self.link.get("downlink_mbps"),
        )


class RunFold:
    """Takes a run's records one at a time (`add`) and freezes them into a `RunSnapshot`.

    ``manifest`` is the run's resolved manifest; without one (it did not parse), the fleet is
    whoever the records name. ``on_line``, when set, gets the headless log line of each event
    and evaluation as it is folded.
    """

    def __init__(self, manifest: Manifest | None, run_dir: str = "") -> None:
        self.m = manifest
        self.run_dir = run_dir
        self.on_line: Callable[[str], None] | None = None
        self.dev: dict[str, _Device] = {}
        # "HOST:PORT" once the `listening` event says what was bound: the manifest's port may
        # be 0 (any free port), so the header shows no address before there is a real one.
        self.listen = ""
        if manifest is not None:
            for d in manifest.devices:
                self.dev[d.id] = _Device(d.launch, batch_size=manifest.training.batch_size)
                if d.device != "auto":
                    self.dev[d.id].facts["torch_device"] = d.device
        self.phase = Phase.WAITING
        self.round = 0
        self.message = ""
        self.last_t = 0.0
        self.wall_s: float | None = None  # the final event's: how long the run took
        self.train_t0, self.train_r0 = 0.0, 0  # when (and after which round) training began
        self.evals: list[EvalPoint] = []
        self.rounds: collections.deque[RoundPoint] = collections.deque(maxlen=200)
        self.events: collections.deque[EventLine] = collections.deque(maxlen=50)
        self.repeats = 0  # how many routine lines the log's last line stands for
        self.join_deadline_s: float | None = None  # when the wait for the fleet times out
        self.gapsl: GapslView | None = None
        self._add = {
            "events": self._event, "devices": self._telemetry,
            "rounds": self._round, "metrics": self._metric,
        }  # fmt: skip

    def add(self, name: str, record: dict[str, Any]) -> None:
        """Fold one record of ``<name>.jsonl`` (a `RunRecords` subscriber); others are ignored."""
        handler = self._add.get(name)
        if handler is not None:
            handler(record)

    @property
    def last_eval(self) -> EvalPoint | None:
        return self.evals[-1] if self.evals else None

    def _device(self, dev: Any, admitted: bool = True) -> _Device | None:
        if not isinstance(dev, str):
            return None
        if self.m is None and admitted and dev not in self.dev:
            self.dev[dev] = _Device("remote")  # without a manifest, whoever the records name
        return self.dev.get(dev)

    # --- events.jsonl ---------------------------------------------------------------------------

    def _event(self, rec: dict[str, Any]) -> None:
        t, name, raw = _num(rec.get("t")), str(rec.get("event", "?")), rec.get("device")
        self.last_t = max(self.last_t, t) if t == t else self.last_t
        d = self._device(raw, admitted=name in _JOINED)
        if d is not None:
            self._device_event(d, name, rec)
        if name == "preparing":  # a run (or a resumed run) starts: everyone is to join again
            self.phase, self.message, self.wall_s = Phase.WAITING, "", None
            self.join_deadline_s = None
            for v in self.dev.values():
                v.status = DeviceStatus.WAITING
            self.listen = "in-process" if rec.get("engine") == "in-process" else ""
        elif name == "joining":
            timeout = finite(rec.get("timeout_s"))
            self.join_deadline_s = None if timeout is None or t != t else t + timeout
        elif name == "listening" and isinstance(rec.get("url"), str):
            self.listen = rec["url"].split("://", 1)[-1]
        elif name == "round_started":
            self.round = _int(rec.get("round"))
            asked = set(str(rec.get("asked", "")).split(","))
            # Computing from the work request on; one left out of this round (participation,
            # a deadline) is idle again, not still computing an earlier round's batch.
            for i, v in self.dev.items():
                if i in asked and v.status in _AT_WORK:
                    v.status = DeviceStatus.COMPUTING
                elif v.status == DeviceStatus.COMPUTING:
                    v.status = DeviceStatus.JOINED
        elif name == "phase" and (phase := _phase_of(rec.get("phase"))) is not None:
            self._phase(phase, t, _int(rec.get("round")))
        elif name == "resumed":
            self.round = _int(rec.get("round"))
        elif name == "stopping":
            self.message = STOP_MESSAGE
        elif name in _ENDS:
            self.phase, self.message = _ENDS[name], str(rec.get("reason", ""))
            self.wall_s = finite(rec.get("wall_s"))
            # The orchestrator says goodbye to every connected device (engine: _say_bye).
            for v in self.dev.values():
                if v.status not in (DeviceStatus.WAITING, DeviceStatus.LOST):
                    v.status = DeviceStatus.DONE
        if name in HIDDEN_EVENTS:
            return
        fields = {k: v for k, v in rec.items() if k not in ("t", "event", "device")}
        line = EventLine(t, name, raw if isinstance(raw, str) else None, describe(fields))
        if self.on_line is not None:  # the headless line keeps the records' own key=value
            self.on_line(format_event(dataclasses.replace(line, text=key_values(fields))))
        last = self.events[-1] if self.events else None
        if name in ROUTINE_EVENTS and last is not None and last.event == name:
            self.repeats += 1
            self.events[-1] = EventLine(t, name, line.device, f"{line.text} ({self.repeats}×)")
            return
        self.repeats = 1
        self.events.append(line)

    def _device_event(self, d: _Device, name: str, rec: dict[str, Any]) -> None:
        if name in _JOINED:
            d.status = DeviceStatus.JOINED
            # The hello's facts (joined, rejoined) and the torch device the job runs on (ready).
            facts = ("hostname", "platform", "torch_device", "cpu_count", "memory_bytes")
            d.facts.update({k: rec[k] for k in facts if isinstance(rec.get(k), (str, int))})
            if name == "ready":
                d.shard_size = _int(rec.get("shard_size"))
        elif name in ("lost", "awaiting_return"):  # the exit may be heard before the close
            d.status = DeviceStatus.LOST
        elif name == "placed":  # on a Ray node: its IP and (the start of) its id
            d.facts["node"] = f"{rec.get('node_ip', '?')}/{str(rec.get('node_id', ''))[:8]}"
        elif name == "unstable":
            d.warning = str(rec.get("why", "unstable"))
        elif name == "straggler" and d.status in _AT_WORK:
            d.status = DeviceStatus.STRAGGLING
        elif name == "agent_exited" and rec.get("code") == 0:
            # Other codes say nothing new: a crash mid-run also closes the link ("lost").
            d.status = DeviceStatus.DONE

    def _phase(self, phase: Phase, t: float, r: int) -> None:
        if phase == Phase.TRAINING and self.phase == Phase.WAITING:
            self.train_t0, self.train_r0 = (t if t == t else 0.0), r
        if phase != Phase.TRAINING:  # evaluating or checkpointing: no round in flight
            for v in self.dev.values():
                v.status = DeviceStatus.JOINED if v.status in _AT_WORK else v.status
        self.phase = phase

    # --- devices.jsonl, rounds.jsonl, metrics.jsonl ---------------------------------------------

    def _telemetry(self, rec: dict[str, Any]) -> None:
        """A probe's measurement or a device's telemetry: the latest of each figure counts."""
        d = self._device(rec.get("device"))
        if d is None:
            return
        d.link.update({k: finite(rec[k]) for k in _LINK_KEYS if k in rec})
        if rec.get("source") == "probe":
            d.probe_ms = finite(rec.get("compute_ms_per_sample"))

    def _round(self, rec: dict[str, Any]) -> None:
        r = rec.get("round")
        if not isinstance(r, int) or isinstance(r, bool):
            return
        devs = {k: v for k, v in (rec.get("devices") or {}).items() if isinstance(v, dict)}
        participants = rec.get("participants")
        ids = [str(i) for i in participants] if isinstance(participants, list) else list(devs)
        for i in ids:
            dev, x = self._device(i), devs.get(i, {})
            if dev is None:
                continue
            dev.rounds_done = r
            dev.batch_size = batch = _int(x.get("batch"))
            compute = finite(x.get("compute_s"))
            dev.round_ms = None if compute is None else 1000.0 * compute / max(batch, 1)
            dev.last_loss = finite(x.get("loss"))
        slowest = max(devs.values(), key=lambda x: finite(x.get("wait_s")) or 0.0, default={})
        _drop_from(self.rounds, r)
        self.rounds.append(
            RoundPoint(
                round=r, round_time_s=_num(rec.get("round_time_s")), loss=_num(rec.get("loss")),
                predicted_s=finite(rec.get("predicted_s")),
                compute_s=finite(slowest.get("compute_s")) or 0.0,
                uplink_s=finite(slowest.get("uplink_s")) or 0.0,
                server_s=finite(rec.get("server_s")) or 0.0,
                downlink_s=finite(rec.get("downlink_s")) or 0.0,
            )
        )  # fmt: skip
        leaders, cos = rec.get("leaders"), rec.get("cos")
        if isinstance(leaders, list) and isinstance(cos, list) and cos:
            # The cosine matrix's rows are the round's participants, in their order.
            order = ids if len(ids) == len(cos) else [f"#{k + 1}" for k in range(len(cos))]
            # After GDA: this round's when the orchestrator knows it (the blend modes), else
            # the latest the devices reported (the round before's, with their next upload).
            after = finite(rec.get("align_after"))
            if after is None:
                after = finite(rec.get("align_after_prev"))
            if after is None and self.gapsl is not None:
                after = self.gapsl.align_after
            self.gapsl = GapslView(
                leaders=tuple(str(x) for x in leaders),
                cosine=tuple(tuple(_num(v) for v in row) for row in cos),
                device_ids=tuple(order),
                align_before=finite(rec.get("align_before")),
                align_after=after,
                churn=finite(rec.get("churn")),
            )

    def _metric(self, rec: dict[str, Any]) -> None:
        r = rec.get("round")
        if not isinstance(r, int) or isinstance(r, bool):
            return
        keys = ("time_s", "acc_mean", "acc_min", "acc_max", "loss")
        point = EvalPoint(r, *(_num(rec.get(k)) for k in keys))
        _drop_from(self.evals, r)
        self.evals.append(point)
        for dev, acc in (rec.get("acc") or {}).items():
            d = self._device(dev)
            if d is not None:
                d.accuracy = finite(acc)
        if self.on_line is not None:
            self.on_line(format_eval(point, self.total_rounds()))

    # --- the snapshot ---------------------------------------------------------------------------

    def total_rounds(self) -> int:
        return self.m.training.rounds if self.m is not None else self.round

    def eta_s(self, elapsed_s: float) -> float | None:
        """Time left at the pace of the rounds run since training (re)started."""
        done = self.round - self.train_r0
        if done <= 0 or self.phase in (Phase.FAILED, Phase.INTERRUPTED):
            return None
        left = max(self.total_rounds() - self.round, 0)
        return max(elapsed_s - self.train_t0, 0.0) / done * left

    def snapshot(self, now_s: float) -> RunSnapshot:
        """Everything the dashboard shows; ``now_s`` is the caller's clock (seconds since the
        run started), used until the run's final event says how long it took."""
        elapsed = self.wall_s if self.wall_s is not None else max(now_s, self.last_t)
        m = self.m
        if m is not None:
            t, d = m.training, m.data
            ident = (m.testbed.name, t.algorithm, t.dataset, d.partition)
            alpha = d.alpha if d.partition == "dirichlet" else None
        else:
            ident, alpha = (Path(self.run_dir).name, "?", "?", "?"), None
        return RunSnapshot(
            *ident,
            alpha=alpha,
            listen=self.listen,
            phase=self.phase,
            round=self.round,
            rounds=self.total_rounds(),
            elapsed_s=elapsed,
            eta_s=self.eta_s(elapsed),
            devices=tuple(v.view(i) for i, v in self.dev.items()),
            evals=tuple(self.evals),
            recent_rounds=tuple(self.rounds),
            events=tuple(self.events),
            gapsl=self.gapsl,
            join_deadline_s=self.join_deadline_s,
            run_dir=self.run_dir,
            message=self.message,
        )
