"""The manifest's sections: one frozen dataclass per ``testbed.toml`` table, plus ``Manifest``.

Each field carries its own constraints (choices, a check), so the key list, the defaults and the
checks exist once; ``orchestrator.config.manifest`` reads raw TOML into these classes and re-exports them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from edge_agent.datasets import DATASETS
from models.spec import is_spec, spec_problem
from orchestrator.algorithms.registry import RULE_NAMES
from orchestrator.config.values import split_listen, toml_value
from orchestrator.errors import ManifestError

Check = Callable[[Any], Optional[str]]  # returns a problem, or None when the value is fine

DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]+")
_DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


# --- constraints -----------------------------------------------------------------------------


def _rule(ok: Callable[[Any], bool], rule: str) -> Check:
    return lambda v: None if ok(v) else f"must be {rule}, got {toml_value(v)}"


def _listen(v: str) -> str | None:
    try:
        split_listen(v)
    except ValueError as exc:
        return str(exc)
    return None


def _listen_or_off(v: str) -> str | None:
    return None if v == "" else _listen(v)


def _opt(default: Any, *, choices: Sequence[str] = (), check: Check | None = None) -> Any:
    return field(default=default, metadata={"choices": tuple(choices), "check": check})


_positive = _rule(lambda v: v > 0, "> 0")
_non_negative = _rule(lambda v: v >= 0, ">= 0")
_at_least_one = _rule(lambda v: v >= 1, ">= 1")
_unit_open_hi = _rule(lambda v: 0 <= v < 1, "in [0, 1)")
_unit_open_lo = _rule(lambda v: 0 < v <= 1, "in (0, 1]")
_non_empty = _rule(lambda v: bool(v.strip()), "non-empty")
_device_id = _rule(lambda v: bool(DEVICE_ID.fullmatch(v)), "made of A-Za-z0-9_.- only")
_deadline = _rule(lambda v: v == 0 or v >= 1, "0 (no deadline) or >= 1")


def _name_or_spec(v: str) -> str | None:
    """A name (or a path) that is not empty; with a colon, a well-formed package.module:name
    (whether it imports is the preflights' business: orchestrator/preflight.py)."""
    return _non_empty(v) or (spec_problem(v) if is_spec(v) else None)


# --- sections --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedConfig:
    """Where the orchestrator listens and how long it waits for the fleet."""

    __test__ = False  # not a pytest test class, despite the name

    name: str = _opt("digits-local", check=_non_empty)
    listen: str = _opt("127.0.0.1:8765", check=_listen)  # port 0: pick a free port
    join_timeout_s: float = _opt(120.0, check=_positive)
    round_timeout_s: float = _opt(120.0, check=_positive)
    max_message_bytes: int = _opt(64 * 1024 * 1024, check=_positive)
    ping_interval_s: float = _opt(10.0, check=_positive)
    ping_timeout_s: float = _opt(30.0, check=_positive)
    runs_dir: str = _opt("runs", check=_non_empty)  # relative to the working directory
    # wss:// (README, "TLS for a lab testbed"): PEM files; relative paths resolve against the
    # manifest's folder. "" for tls_cert and tls_key = plain ws://.
    tls_cert: str = _opt("")
    tls_key: str = _opt("")
    tls_ca: str = _opt("")  # the CA local agents trust (--ca-file); needed with local agents
    # A device whose connection has been gone this long is left out of rounds until it is back.
    patience_s: float = _opt(30.0, check=_positive)
    # With fewer than scheduler.min_participants devices connected, wait this long, then fail.
    lost_timeout_s: float = _opt(300.0, check=_positive)
    # Local agents that die (killed, crashed) are started again, at most this many times each.
    respawn_local: int = _opt(3, check=_non_negative)
    # Prometheus metrics of the run at http://HOST:PORT/metrics (the [metrics] extra); "" = off.
    metrics_listen: str = _opt("", check=_listen_or_off)
    # Connections accepted and not yet admitted (no valid hello yet). Past this many, a new one
    # is closed with 1013 once its handshake is done; past twice as many, reset at accept.
    max_pending_connections: int = _opt(256, check=_at_least_one)
    # A connection that has sent no hello this long after its handshake is closed (1002).
    hello_timeout_s: float = _opt(5.0, check=_positive)
    # Refusals before admission repeated within this interval (same source, reason, device) are
    # counted into one `refused` line per interval (`count`); 0 writes every refusal.
    refusal_summary_s: float = _opt(10.0, check=_non_negative)
    # A source address failing before admission (1002, 1003, 1007, 1008, 1009) penalty_after
    # times within a minute is reset at accept for penalty_s, twice as long on each repeat up to
    # penalty_max_s; a source a listed device was admitted from is exempt. 0 = no penalties.
    penalty_after: int = _opt(5, check=_non_negative)
    penalty_s: float = _opt(10.0, check=_positive)
    penalty_max_s: float = _opt(600.0, check=_positive)
    # Who shapes the emulated links of local agents ([devices.emulate] uplink_mbps,
    # downlink_mbps, rtt_ms): "agent" (its own transport) or "kernel" (tbf on a veth pair into a
    # network namespace per agent, netem for the RTT where the kernel has it; root on Linux).
    link_shaper: str = _opt("agent", choices=("agent", "kernel"))


@dataclass(frozen=True)
class TrainingConfig:
    """The learning problem and the optimiser every device and the server use."""

    # "central" (pooled data, one learner: the accuracy ceiling) runs only in-process (simulate).
    algorithm: str = _opt("psl", choices=RULE_NAMES)
    # digits | fashion_mnist | cifar10, a folder holding train.npz/test.npz (relative paths
    # resolve against the manifest), or "package.module:loader" (docs/own-model-and-data.md)
    dataset: str = _opt("digits", check=_name_or_spec)
    # "auto": the dataset's default small model; a model of models/, or "package.module:factory"
    model: str = _opt("auto", check=_name_or_spec)
    cut: str = _opt("default", check=_non_empty)
    rounds: int = _opt(100, check=_at_least_one)
    batch_size: int = _opt(32, check=_at_least_one)
    eval_every: int = _opt(10, check=_at_least_one)
    seed: int = _opt(0, check=_non_negative)  # numpy generators refuse negative seeds
    lr: float = _opt(0.05, check=_positive)
    # "cosine": every learning rate (devices and server) anneals from lr to 0 over the rounds
    lr_decay: str = _opt("none", choices=("none", "cosine"))
    # the devices' rate is lr * client_lr_scale (the server keeps lr); 0 freezes every client
    # partition at the shared initial weights, the control that shows what client drift costs
    client_lr_scale: float = _opt(1.0, check=_non_negative)
    # > 0: every client partition is pulled towards the shared initial weights with this L2
    # coefficient (a regulariser against drift; no weights or gradients are exchanged)
    client_anchor: float = _opt(0.0, check=_non_negative)
    momentum: float = _opt(0.9, check=_unit_open_hi)
    weight_decay: float = _opt(0.0, check=_non_negative)
    # Cut-layer activations and their gradients on the wire: "fp16", or "int8" with one scale
    # per tensor. Lossy: the study in docs/results.md measures what it costs in accuracy.
    compression: str = _opt("none", choices=("none", "fp16", "int8"))


@dataclass(frozen=True)
class DataConfig:
    """How the dataset is found and split across devices."""

    partition: str = _opt("iid", choices=("iid", "dirichlet", "shards"))
    alpha: float = _opt(0.5, check=_positive)
    shards_per_device: int = _opt(2, check=_at_least_one)
    dir: str = _opt("")  # "" = default lookup; relative paths resolve against the manifest
    download: bool = _opt(False)
    test_limit: int = _opt(0, check=_non_negative)  # 0 = the whole test set


@dataclass(frozen=True)
class ServerConfig:
    """Where the server partition runs."""

    device: str = _opt("auto", choices=_DEVICE_CHOICES)
    # torch CPU threads for the server partition; 0 = one thread when local agents share this
    # machine's cores (more would only contend with them), else torch's default
    threads: int = _opt(0, check=_non_negative)


@dataclass(frozen=True)
class GapslConfig:
    """LGI and GDA knobs (see DESIGN.md: an explicit reconstruction of the method)."""

    space: str = _opt("client", choices=("server", "client", "cut"))
    # The defaults are the gated study's choice (docs/results.md): the leader-trajectory anchor
    # with the label-prior correction. Outside the client space with gradient leaders, where
    # neither applies, unset gda_mode and prior_tau mean first_order and 0 (config.manifest).
    gda_mode: str = _opt("anchor", choices=("exact", "first_order", "pull", "tracking", "anchor"))
    gda_lambda: float = _opt(1.0, check=_non_negative)
    tau: float = _opt(
        0.0, check=_rule(lambda v: -1 <= v <= 1, "in [-1, 1]")
    )  # a mean cosine, so it lives in [-1, 1]
    rho: float = _opt(0.5, check=_unit_open_lo)
    ema_beta: float = _opt(0.9, check=_unit_open_hi)
    # client space: LGI and GDA act on the raw gradients ("gradient") or on the momentum steps
    # the devices' optimizers would take ("update"; each device's momentum keeps its own)
    leader: str = _opt("gradient", choices=("gradient", "update"))
    # tracking GDA: r_i, each device's reference for its own gradient, is an EMA of it with this
    # coefficient; 0 keeps the previous round's gradient (gradient tracking)
    track_beta: float = _opt(0.0, check=_unit_open_hi)
    # client space: the devices get the gradient of CE(z + prior_tau * log pi_i, y), pi_i their
    # label prior; the server's own update stays PSL's. 0 = off (PSL's gradients)
    prior_tau: float = _opt(1.0, check=_non_negative)


@dataclass(frozen=True)
class SflConfig:
    """SplitFed baseline: FedAvg of client partitions every ``avg_every`` rounds."""

    avg_every: int = _opt(1, check=_at_least_one)


@dataclass(frozen=True)
class EpslConfig:
    """EPSL baseline: last-layer gradient aggregation ratio (0 is PSL)."""

    phi: float = _opt(0.5, check=_rule(lambda v: 0 <= v <= 1, "in [0, 1]"))


@dataclass(frozen=True)
class SchedulerConfig:
    """Who takes part in a round and how long the server waits for them."""

    policy: str = _opt("uniform", choices=("uniform", "latency_balanced"))
    # latency_balanced: no device is planned below this share of training.batch_size
    min_batch_fraction: float = _opt(0.25, check=_rule(lambda v: 0 < v <= 1, "in (0, 1]"))
    # a device planned below training.batch_size steps lr * b_i / batch_size ("linear")
    step_scaling: str = _opt("linear", choices=("linear", "none"))
    # a device planned below training.batch_size: the server tops its batch up to batch_size
    # with that device's most recent earlier samples ("replay"; training/replay.py)
    top_up: str = _opt("replay", choices=("none", "replay"))
    deadline_factor: float = _opt(0.0, check=_deadline)
    min_participants: int = _opt(1, check=_at_least_one)
    participation: float = _opt(1.0, check=_unit_open_lo)


@dataclass(frozen=True)
class DashboardConfig:
    """The live terminal view."""

    refresh_hz: float = _opt(4.0, check=_positive)


@dataclass(frozen=True)
class EmulateConfig:
    """An emulated device profile; the defaults emulate nothing."""

    compute_slowdown: float = _opt(1.0, check=_rule(lambda v: v >= 1, ">= 1"))
    # added to every compute step (forward, backward) whatever its batch: a per-call cost
    compute_fixed_ms: float = _opt(0.0, check=_non_negative)
    uplink_mbps: float = _opt(0.0, check=_non_negative)  # 0 = unlimited
    downlink_mbps: float = _opt(0.0, check=_non_negative)  # 0 = unlimited
    rtt_ms: float = _opt(0.0, check=_non_negative)

    @property
    def active(self) -> bool:
        """Whether any setting differs from "no emulation"."""
        return self != EmulateConfig()


def _ray_address(v: str) -> str | None:
    if v in ("auto", "local") or v.startswith("ray://"):
        return None
    if _listen(v) is None:
        return None
    return f'must be "auto", "local", "HOST:PORT" or "ray://HOST:PORT", got {toml_value(v)}'


@dataclass(frozen=True)
class DeviceRayConfig:
    """What a ``launch = "ray"`` device's agent reserves on its node (``[devices.ray]``); a key
    left out takes the ``[ray]`` section's value."""

    num_cpus: float = _opt(1.0, check=_non_negative)
    num_gpus: float = _opt(0.0, check=_non_negative)
    memory_mb: int = _opt(0, check=_non_negative)  # 0 = no memory reservation
    node_ip: str = _opt("")  # "" = any node that has the resources; else only that node


RAY_DEVICE_KEYS = tuple(f.name for f in fields(DeviceRayConfig))


@dataclass(frozen=True)
class RayConfig(DeviceRayConfig):
    """The Ray cluster that ``launch = "ray"`` devices are placed on, and their default
    reservation (README, "Placing agents on a Ray cluster")."""

    # "auto": the cluster this machine is a node of (`ray start`); "local": a one-machine Ray
    # instance started for the run; "HOST:PORT": a head's GCS; "ray://HOST:PORT": Ray Client.
    address: str = _opt("auto", check=_ray_address)
    # The host placed agents dial; "" = testbed.listen's host, or for a wildcard listen
    # (0.0.0.0, ::) the address Ray knows this machine by.
    dial_host: str = _opt("")
    connect_timeout_s: float = _opt(30.0, check=_positive)  # reaching the cluster
    place_timeout_s: float = _opt(120.0, check=_positive)  # an agent's actor starting on a node


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[[devices]]`` entry: a lab device, or an agent the orchestrator starts (locally,
    or on a Ray cluster's node)."""

    id: str = field(metadata={"check": _device_id})
    token: str = field(repr=False, metadata={"check": _non_empty})  # kept out of logs
    launch: str = _opt("remote", choices=("remote", "local", "ray"))
    device: str = _opt("auto", choices=_DEVICE_CHOICES)
    emulate: EmulateConfig = field(default_factory=EmulateConfig)
    ray: DeviceRayConfig = field(default_factory=DeviceRayConfig)


SECTIONS: dict[str, type] = {
    "testbed": TestbedConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "server": ServerConfig,
    "gapsl": GapslConfig,
    "sfl": SflConfig,
    "epsl": EpslConfig,
    "scheduler": SchedulerConfig,
    "dashboard": DashboardConfig,
    "ray": RayConfig,
}


OVERRIDE_SOURCE = "--set"


def blame(source: str, overridden: Sequence[str], key: str, problem: str) -> ManifestError:
    """The error about ``key``, named after ``source``, or after --set when it overrode the key."""
    from_set = any(key == o or key.startswith(o + ".") for o in overridden)
    return ManifestError(OVERRIDE_SOURCE if from_set else source, key, problem)


class TlsFiles(NamedTuple):
    """``testbed.tls_*`` resolved to paths."""

    cert: Path
    key: Path
    ca: Path | None


@dataclass(frozen=True)
class Manifest:
    """A validated testbed manifest. ``source``/``base_dir`` say where it came from and are left
    out of equality, so a manifest equals its own ``manifest_to_toml`` round trip."""

    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    gapsl: GapslConfig = field(default_factory=GapslConfig)
    sfl: SflConfig = field(default_factory=SflConfig)
    epsl: EpslConfig = field(default_factory=EpslConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    devices: tuple[DeviceConfig, ...] = ()
    source: str = field(default="<string>", compare=False)
    # The file the device tokens were read from (absolute; "" when not from a file).
    tokens_from: str = field(default="", compare=False)
    base_dir: Path = field(default_factory=Path.cwd, compare=False)
    # the dotted keys that --set overrode: an error about one of them blames "--set"
    overridden: tuple[str, ...] = field(default=(), compare=False)

    def error(self, key: str, problem: str) -> ManifestError:
        """A ManifestError about ``key`` (dotted), blaming --set when the value came from it.

        For problems found after loading (the preflights: data, model, port, TLS files)."""
        return blame(self.source, self.overridden, key, problem)

    def listen_host_port(self) -> tuple[str, int]:
        """``testbed.listen`` as ``(host, port)``; port 0 means "pick a free port"."""
        return split_listen(self.testbed.listen)

    def dataset_spec(self) -> str:
        """``training.dataset`` as the devices get it: a folder resolved against the manifest's
        folder (local agents may run elsewhere), a built-in name or a loader as written."""
        name = self.training.dataset
        if name in DATASETS or is_spec(name):
            return name
        return str(self._path(name))

    def data_dir(self) -> Path | None:
        """``data.dir`` resolved against the manifest's folder, or None for the default lookup."""
        return self._path(self.data.dir)

    def tls_files(self) -> TlsFiles | None:
        """``testbed.tls_cert``/``tls_key``/``tls_ca`` as paths, or None when TLS is off."""
        cert, key = self._path(self.testbed.tls_cert), self._path(self.testbed.tls_key)
        if cert is None or key is None:
            return None
        return TlsFiles(cert, key, self._path(self.testbed.tls_ca))

    def _path(self, value: str) -> Path | None:
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def device(self, id: str) -> DeviceConfig:
        """The ``[[devices]]`` entry with this id; KeyError if there is none."""
        for dev in self.devices:
            if dev.id == id:
                return dev
        raise KeyError(f"no device {id!r} in the manifest")
