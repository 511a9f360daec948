"""The agent's configuration: where to dial, who it is, and every bound on waiting for the network.

The command line (``edge_agent.cli``) fills one :class:`AgentConfig`; its defaults are the CLI's.
Every send and receive of the agent is bounded by one of the ``*_s`` values here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .emulation import EmulationProfile

# Redial backoff: the first retry comes soon (a restarting orchestrator is back within a second
# or two), then the delay doubles up to a cap that keeps a rebooted lab's devices rejoining
# within seconds of the orchestrator coming back, without hammering it in the meantime.
REDIAL_FIRST_S = 0.5
REDIAL_MAX_S = 10.0
# Each wait is drawn between this share of the delay and all of it, so that the devices of a
# rebooted lab do not all redial in step.
REDIAL_JITTER = 0.5


@dataclass(frozen=True)
class AgentConfig:
    """One agent's settings; the ``*_s`` fields bound every wait on the orchestrator."""

    url: str
    device_id: str
    token: str = field(repr=False)  # a secret: kept out of any log of the config
    data_dir: Path | None = None
    download: bool = False
    device: str = "auto"
    emulation: EmulationProfile = field(default_factory=EmulationProfile)
    max_message_bytes: int = 256 * 1024 * 1024  # a job with large initial weights must fit
    # The opening and closing handshakes (websockets' open_timeout and close_timeout), the same
    # as the orchestrator's: a handshake that takes longer is a dead or overloaded link.
    open_timeout_s: float = 10.0
    close_timeout_s: float = 5.0
    # websockets' own keepalive, as the orchestrator's defaults: a peer that stops answering
    # pings is noticed within ping_interval_s + ping_timeout_s.
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 30.0
    # A frame not handed to the network within this long is given up with its connection: the
    # orchestrator waits testbed.round_timeout_s (default 120 s) for a reply, so a later one
    # would not count anyway, and a redial gets a fresh link.
    send_timeout_s: float = 120.0
    # No frame from the orchestrator for this long: drop the connection and redial. Longer than
    # any silence of a healthy orchestrator (waiting for the fleet to join, for a lost device,
    # testbed.lost_timeout_s = 300 s by default, or evaluating); the keepalive catches a dead
    # link far sooner, this catches an orchestrator that answers pings but says nothing.
    idle_timeout_s: float = 900.0
    give_up_s: float = 300.0  # stop redialling after this long without an orchestrator
    ca_file: Path | None = None  # wss://: trust only this CA; None = the system store
    telemetry_every_s: float = 2.0
    checkpoint_dir: Path | None = None  # local checkpoints of the client partition; None = off
