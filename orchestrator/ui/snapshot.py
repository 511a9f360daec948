"""Immutable views of a run's state: what the fold of its records (``fold.py``) produces.

The dashboard and the headless log formatter read only these frozen types, never the engine's
mutable state, so rendering can happen anywhere without locks.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.names import DeviceStatus, Phase

DEVICE_STATUSES = tuple(DeviceStatus)
PHASES = tuple(Phase)
LAUNCH_KINDS = ("local", "remote", "ray")


@dataclass(frozen=True)
class DeviceView:
    """One device as the fleet table shows it; `None` means "not measured yet"."""

    id: str
    status: str  # one of DEVICE_STATUSES
    launch: str  # one of LAUNCH_KINDS
    hostname: str = ""
    platform: str = ""  # e.g. "Linux aarch64"
    torch_device: str = ""  # "cpu" | "cuda" | "mps"
    cpu_count: int = 0
    memory_gib: float = 0.0
    cpu_percent: float | None = None
    mem_percent: float | None = None
    temp_c: float | None = None
    compute_ms_per_sample: float | None = None
    rtt_ms: float | None = None
    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    batch_size: int = 0
    shard_size: int = 0
    rounds_done: int = 0
    last_loss: float | None = None
    accuracy: float | None = None
    warning: str = ""  # the last `unstable` event's reason: its training runs away
    node: str = ""  # a Ray-placed agent's node: "IP/node-id prefix"


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation over every device's (client ∘ server) model on the common test set."""

    round: int
    time_s: float
    acc_mean: float
    acc_min: float
    acc_max: float
    loss: float


@dataclass(frozen=True)
class RoundPoint:
    """Timing and loss of one finished round; the phase seconds are the slowest device's."""

    round: int
    round_time_s: float
    loss: float
    predicted_s: float | None = None  # the latency model's prediction for this round
    compute_s: float = 0.0
    uplink_s: float = 0.0
    server_s: float = 0.0
    downlink_s: float = 0.0


@dataclass(frozen=True)
class EventLine:
    """One entry of the event log; `t` is seconds since the run started."""

    t: float
    event: str
    device: str | None
    text: str


@dataclass(frozen=True)
class GapslView:
    """The last round's leader gradient identification: cosine matrix and leader set."""

    leaders: tuple[str, ...]
    cosine: tuple[tuple[float, ...], ...]  # rows and columns ordered as `device_ids`
    device_ids: tuple[str, ...]
    align_before: float | None = None  # mean cos(g_i, g_L) before alignment
    # ... and after it: the latest known (the devices report theirs a round late)
    align_after: float | None = None
    churn: float | None = None  # mean share of the leader set replaced per round, recent rounds


@dataclass(frozen=True)
class RunSnapshot:
    """Everything the dashboard shows, frozen at one instant."""

    name: str
    algorithm: str
    dataset: str
    partition: str
    alpha: float | None
    listen: str  # "HOST:PORT" the orchestrator serves
    phase: str  # one of PHASES
    round: int
    rounds: int
    elapsed_s: float
    eta_s: float | None
    devices: tuple[DeviceView, ...]
    evals: tuple[EvalPoint, ...]  # every evaluation so far; renderers show the tail that fits
    recent_rounds: tuple[RoundPoint, ...]  # the last <= 200 rounds
    events: tuple[EventLine, ...]  # the last <= 50 events
    gapsl: GapslView | None = None  # None for baselines with nothing to show
    join_deadline_s: float | None = None  # elapsed_s at which the wait for the fleet times out
    run_dir: str = ""
    message: str = ""  # e.g. a failure reason

    @property
    def missing(self) -> tuple[str, ...]:
        """Ids of the devices that have not joined yet."""
        return tuple(d.id for d in self.devices if d.status == "waiting")

    @property
    def last_eval(self) -> EvalPoint | None:
        """The most recent evaluation, if any."""
        return self.evals[-1] if self.evals else None
