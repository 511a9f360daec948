"""Device profiles from measurement and the latency model that predicts a round's time.

On join each device is probed over its live connection: application-level echoes give the RTT
(median and jitter), echoes carrying activation-sized payloads one way give downlink and uplink
throughput, and a short benchmark of the device's real client partition gives forward and
backward time per sample. Every round then updates the profile passively (smoothed) from the
real transfers and compute timings.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

SMOOTHING = 0.3  # weight of a new round's measurement in the running profile
RTT_SAMPLES = 7
THROUGHPUT_SAMPLES = 3


@dataclass
class DeviceProfile:
    fwd_ms_per_sample: float = 0.0
    bwd_ms_per_sample: float = 0.0
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    uplink_mbps: float = math.inf
    downlink_mbps: float = math.inf

    @property
    def compute_ms_per_sample(self) -> float:
        return self.fwd_ms_per_sample + self.bwd_ms_per_sample

    def record(self) -> dict[str, Any]:
        out = {
            k: (None if isinstance(v, float) and math.isinf(v) else round(v, 4))
            for k, v in asdict(self).items()
        }
        out["compute_ms_per_sample"] = round(self.compute_ms_per_sample, 4)
        return out

    def update_compute(self, fwd_s: float, bwd_s: float | None, batch: int) -> None:
        if batch <= 0:
            return
        self.fwd_ms_per_sample = _ema(self.fwd_ms_per_sample, 1000.0 * fwd_s / batch)
        if bwd_s is not None:
            self.bwd_ms_per_sample = _ema(self.bwd_ms_per_sample, 1000.0 * bwd_s / batch)

    def update_uplink(self, nbytes: int, path_s: float, down_bytes: int = 0) -> None:
        """Passive uplink estimate from one round's path (request to reply, compute removed).

        The path also holds the RTT and the downlink of the previous gradient: both are taken
        out with the current profile before what is left is read as the upload's time.
        """
        down = (
            down_bytes * 8 / (self.downlink_mbps * 1e6)
            if math.isfinite(self.downlink_mbps)
            else 0.0
        )
        transfer = path_s - self.rtt_ms / 1000.0 - down
        if nbytes >= 64 * 1024 and transfer > 1e-4:  # small or instant transfers say nothing
            self.uplink_mbps = _ema(self.uplink_mbps, nbytes * 8 / transfer / 1e6)


def _ema(old: float, new: float) -> float:
    if old == 0.0 or math.isinf(old):
        return new
    return (1.0 - SMOOTHING) * old + SMOOTHING * new


def link_from_samples(
    rtts_s: list[float], down: list[tuple[int, float]], up: list[tuple[int, float]]
) -> tuple[float, float, float, float]:
    """(rtt_ms, jitter_ms, downlink_mbps, uplink_mbps) from echo timings.

    An echo with a payload of S bytes one way takes RTT + S / bandwidth; the echo's small
    frames cost the RTT alone, which is subtracted (median of the samples).
    """
    rtt = statistics.median(rtts_s)
    jitter = statistics.pstdev(rtts_s) if len(rtts_s) > 1 else 0.0

    def rate(samples: list[tuple[int, float]]) -> float:
        rates = [n * 8 / (t - rtt) / 1e6 for n, t in samples if t - rtt > 1e-5]
        return statistics.median(rates) if rates else math.inf

    return rtt * 1000.0, jitter * 1000.0, rate(down), rate(up)


@dataclass(frozen=True)
class Prediction:
    total_s: float
    device_s: dict[str, float]  # each device's own path: link + compute
    critical: str  # the device on the slowest path
    compute_s: float  # the critical path's split
    uplink_s: float
    downlink_s: float
    server_s: float


def predict_round(
    profiles: Mapping[str, DeviceProfile],
    batch: Mapping[str, int],
    act_bytes_per_sample: float,
    server_s_per_sample: float,
    after_first: bool = True,
) -> Prediction:
    """The latency model of one round as this orchestrator runs it.

    The gradient of round r and the request of round r+1 leave together, so a device's path in
    round r+1 is: RTT + downlink of the gradient + backward + forward + uplink of activations;
    the server then works on all batches. Round time = max over devices of that path + server.
    (In round 1 there is no gradient to apply yet.)
    """
    paths: dict[str, tuple[float, float, float, float]] = {}
    for i, b in batch.items():
        p = profiles[i]
        nbytes = act_bytes_per_sample * b
        compute = b * (p.fwd_ms_per_sample + (p.bwd_ms_per_sample if after_first else 0.0)) / 1000.0
        up = nbytes * 8 / (p.uplink_mbps * 1e6) if math.isfinite(p.uplink_mbps) else 0.0
        down = (
            nbytes * 8 / (p.downlink_mbps * 1e6)
            if (after_first and math.isfinite(p.downlink_mbps))
            else 0.0
        )
        paths[i] = (compute, up, down, p.rtt_ms / 1000.0)
    device_s = {i: sum(v) for i, v in paths.items()}
    critical = max(device_s, key=lambda i: device_s[i])
    server_s = server_s_per_sample * sum(batch.values())
    c, u, d, rtt = paths[critical]
    return Prediction(
        total_s=device_s[critical] + server_s,
        device_s=device_s,
        critical=critical,
        compute_s=c,
        uplink_s=u + rtt / 2,
        downlink_s=d + rtt / 2,
        server_s=server_s,
    )
