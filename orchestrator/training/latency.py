"""Device profiles from measurement and the latency model that predicts a round's time.

On join each device is probed over its live connection: application-level echoes give the RTT
(median and jitter), echoes carrying activation-sized payloads one way give downlink and uplink
throughput, and a short benchmark of the device's real client partition gives forward and
backward time as a fixed cost per step plus a cost per sample (two batch sizes). Every round
then refines the profile from the real transfers (smoothed) and compute timings (an affine fit).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SMOOTHING = 0.3  # weight of a new round's measurement in the running profile
RTT_SAMPLES = 7
THROUGHPUT_SAMPLES = 3
# The compute fit forgets: each round, older (batch, seconds) pairs keep this share of their
# weight, so the fit follows about the last ten rounds.
FIT_FORGET = 0.9
# The probe's slope holds its ground as firmly as this many of its points would: rounds that all
# share one batch size say nothing about the slope, and must move only the fixed cost.
FIT_PRIOR_POINTS = 2.0


@dataclass
class AffineFit:
    """A compute step's seconds as ``fixed_s + per_sample_s * batch``, fitted to (batch, s) pairs.

    Seeded by the probe's points (:meth:`from_points`), then refined each round by
    :meth:`observe`: weighted least squares over the pairs (older ones forgotten by
    ``FIT_FORGET``), the slope pulled towards the probe's (ridge, ``FIT_PRIOR_POINTS``). Rounds at
    one batch size therefore keep the probe's slope and move the fixed cost to where the rounds
    are; rounds that span batch sizes fit the slope too. Both stay >= 0.
    """

    fixed_s: float = 0.0
    per_sample_s: float = 0.0
    prior_slope: float = 0.0
    prior_weight: float = 0.0  # ridge strength on the slope: a sum of w (b - mean)^2
    sums: tuple[float, float, float, float, float] = (
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    )  # w, wb, wbb, wt, wbt

    @classmethod
    def from_points(cls, points: list[tuple[int, float]]) -> AffineFit:
        """The line through the probe's (batch, seconds) points; one point: through the origin."""
        fit = cls()
        for b, t in points:
            fit._add(b, t)
        fit._solve()
        bs = [b for b, _ in points]
        mean = sum(bs) / len(bs) if bs else 0.0
        spread = sum((b - mean) ** 2 for b in bs) / max(len(bs), 1)
        fit.prior_slope = fit.per_sample_s
        fit.prior_weight = FIT_PRIOR_POINTS * spread
        fit.sums = (0.0, 0.0, 0.0, 0.0, 0.0)  # rounds, not the probe, are what the fit follows
        return fit

    def at(self, batch: float) -> float:
        """Predicted seconds of a step on ``batch`` samples."""
        return self.fixed_s + self.per_sample_s * batch if batch > 0 else 0.0

    def observe(self, batch: int, seconds: float) -> None:
        """One round's step: ``batch`` samples took ``seconds``."""
        if batch <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        self.sums = tuple(FIT_FORGET * v for v in self.sums)  # type: ignore[assignment]
        self._add(batch, seconds)
        self._solve()

    def _add(self, b: float, t: float) -> None:
        w, wb, wbb, wt, wbt = self.sums
        self.sums = (w + 1.0, wb + b, wbb + b * b, wt + t, wbt + b * t)

    def _solve(self) -> None:
        w, wb, wbb, wt, wbt = self.sums
        if w <= 0:
            return
        lam, c0 = self.prior_weight, self.prior_slope
        det = w * (wbb + lam) - wb * wb
        if det <= 1e-12 * w * max(wbb, 1.0):  # one batch size and no prior: through the origin
            fixed, slope = 0.0, (wbt / wbb if wbb > 0 else 0.0)
        else:
            fixed = ((wbb + lam) * wt - wb * (wbt + lam * c0)) / det
            slope = (w * (wbt + lam * c0) - wb * wt) / det
        if slope < 0:
            fixed, slope = wt / w, 0.0
        elif fixed < 0:
            fixed, slope = 0.0, (wbt + lam * c0) / (wbb + lam) if wbb + lam > 0 else 0.0
        self.fixed_s, self.per_sample_s = fixed, slope


@dataclass
class DeviceProfile:
    """A device's measured link and compute. Compute is affine in the batch: a fixed cost per
    step plus a cost per sample, for the forward and for the backward (optimizer step included).
    """

    fwd_ms_per_sample: float = 0.0
    bwd_ms_per_sample: float = 0.0
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    uplink_mbps: float = math.inf
    downlink_mbps: float = math.inf
    fwd_fixed_ms: float = 0.0
    bwd_fixed_ms: float = 0.0
    fwd_fit: AffineFit | None = field(default=None, repr=False, compare=False)
    bwd_fit: AffineFit | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("fwd", "bwd"):
            if getattr(self, f"{name}_fit") is None:
                fit = AffineFit(
                    getattr(self, f"{name}_fixed_ms") / 1000.0,
                    getattr(self, f"{name}_ms_per_sample") / 1000.0,
                )
                fit.prior_slope = fit.per_sample_s
                setattr(self, f"{name}_fit", fit)
            self._sync(name)

    @classmethod
    def from_bench(
        cls, fwd: list[tuple[int, float]], bwd: list[tuple[int, float]], **link: float
    ) -> DeviceProfile:
        """A profile from the compute probe's (batch, seconds) points and the link figures."""
        return cls(fwd_fit=AffineFit.from_points(fwd), bwd_fit=AffineFit.from_points(bwd), **link)

    @property
    def compute_ms_per_sample(self) -> float:
        """The cost per further sample of a round's forward and backward."""
        return self.fwd_ms_per_sample + self.bwd_ms_per_sample

    @property
    def compute_fixed_ms(self) -> float:
        """The cost of a round's forward and backward whatever the batch."""
        return self.fwd_fixed_ms + self.bwd_fixed_ms

    def compute_s(self, batch: float, backward: bool = True) -> float:
        """Predicted compute seconds of a round on ``batch`` samples (without the backward of
        the previous gradient in round 1)."""
        assert self.fwd_fit is not None and self.bwd_fit is not None
        return self.fwd_fit.at(batch) + (self.bwd_fit.at(batch) if backward else 0.0)

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in ("fwd_ms_per_sample", "bwd_ms_per_sample", "rtt_ms", "jitter_ms",
                  "uplink_mbps", "downlink_mbps", "fwd_fixed_ms", "bwd_fixed_ms"):  # fmt: skip
            v = getattr(self, k)
            out[k] = None if isinstance(v, float) and math.isinf(v) else round(v, 4)
        out["compute_ms_per_sample"] = round(self.compute_ms_per_sample, 4)
        out["compute_fixed_ms"] = round(self.compute_fixed_ms, 4)
        return out

    def update_compute(
        self, fwd_s: float, bwd_s: float | None, batch: int, bwd_batch: int | None = None
    ) -> None:
        """One round's timings: the forward of ``batch`` samples, and the backward (of the
        previous gradient, on ``bwd_batch`` samples: the previous round's batch)."""
        if batch <= 0:
            return
        assert self.fwd_fit is not None and self.bwd_fit is not None
        self.fwd_fit.observe(batch, fwd_s)
        self._sync("fwd")
        if bwd_s is not None:
            self.bwd_fit.observe(bwd_batch or batch, bwd_s)
            self._sync("bwd")

    def _sync(self, name: str) -> None:
        fit = getattr(self, f"{name}_fit")
        setattr(self, f"{name}_fixed_ms", 1000.0 * fit.fixed_s)
        setattr(self, f"{name}_ms_per_sample", 1000.0 * fit.per_sample_s)

    def update_uplink(self, nbytes: int, path_s: float, down_bytes: int = 0) -> None:
        """Passive uplink estimate from one round's path (request to reply, compute removed).

        The path also holds the RTT and the downlink of the previous gradient: both are taken
        out with the current profile before what is left is read as the upload's time.
        """
        transfer = path_s - self.rtt_ms / 1000.0 - send_s(down_bytes, self.downlink_mbps)
        if nbytes >= 64 * 1024 and transfer > 1e-4:  # small or instant transfers say nothing
            self.uplink_mbps = ema(self.uplink_mbps, nbytes * 8 / transfer / 1e6)


def ema(old: float, new: float) -> float:
    """A running figure refined by a new measurement (``SMOOTHING``); 0 or inf: none yet."""
    if old == 0.0 or math.isinf(old):
        return new
    return (1.0 - SMOOTHING) * old + SMOOTHING * new


def send_s(nbytes: float, mbps: float) -> float:
    """Seconds to send ``nbytes`` at ``mbps``; 0 on an unmeasured (infinite) link."""
    return nbytes * 8 / (mbps * 1e6) if math.isfinite(mbps) and mbps > 0 else 0.0


def link_from_samples(
    rtts_s: list[float], down: list[tuple[int, float]], up: list[tuple[int, float]]
) -> tuple[float, float, float, float]:
    """(rtt_ms, jitter_ms, downlink_mbps, uplink_mbps) from echo timings.

    An echo with a payload of S bytes one way takes RTT + S / bandwidth; the echo's small
    frames cost the RTT alone. The RTT reported is their median (what a round typically pays);
    a rate is the fastest transfer's, less the fastest echo. A busy machine only ever adds time
    to a sample (a late wake-up, a process waiting for a core), never removes it, so the
    fastest is the one closest to the link: BBR's filters for the same reason (Cardwell et al.,
    "BBR: Congestion-Based Congestion Control", ACM Queue 14(5), 2016: bottleneck bandwidth as
    the maximum of its samples, propagation delay as the minimum).
    """
    rtt = statistics.median(rtts_s)
    jitter = statistics.pstdev(rtts_s) if len(rtts_s) > 1 else 0.0
    floor = min(rtts_s)

    def rate(samples: list[tuple[int, float]]) -> float:
        rates = [n * 8 / (t - floor) / 1e6 for n, t in samples if t - floor > 1e-5]
        return max(rates) if rates else math.inf

    return rtt * 1000.0, jitter * 1000.0, rate(down), rate(up)


@dataclass(frozen=True)
class Prediction:
    total_s: float
    device_s: dict[str, float]  # each device's own path: link + compute (both trips)
    critical: str  # the device on the slowest path
    compute_s: float  # the critical path's split
    uplink_s: float
    downlink_s: float
    server_s: float
    sync_s: float = 0.0  # the client-space trip: its slowest device's path, and the alignment


def predict_round(
    profiles: Mapping[str, DeviceProfile],
    batch: Mapping[str, int],
    act_bytes_per_sample: float,
    server_s_per_sample: float,
    after_first: bool = True,
    sync_bytes: float = 0.0,
    align_s: float = 0.0,
) -> Prediction:
    """The latency model of one round as this orchestrator runs it.

    The gradient of round r and the request of round r+1 leave together, so a device's path in
    round r+1 is: RTT + downlink of the gradient + backward + forward + uplink of activations;
    the server then works on all batches. Round time = max over devices of that path + server.
    (In round 1 there is no gradient to apply yet.)

    In GAPSL's client space (``sync_bytes`` > 0: the client gradient's size) a round waits
    twice: the forward trip (RTT + the previous round's leader down + forward + activations up),
    the server, then the backward trip (RTT + the activation gradient down + backward + the
    client gradient up), whose slowest device the alignment (``align_s``, the server's LGI)
    waits for. Round time = max forward path + server + max backward path + alignment; a
    device's own path is the sum of its two trips.
    """
    fwd_path: dict[str, tuple[float, float, float, float]] = {}
    bwd_path: dict[str, float] = {}
    for i, b in batch.items():
        p = profiles[i]
        nbytes = act_bytes_per_sample * b
        rtt, up = p.rtt_ms / 1000.0, send_s(nbytes, p.uplink_mbps)
        if sync_bytes > 0:
            assert p.fwd_fit is not None and p.bwd_fit is not None
            leader = send_s(sync_bytes, p.downlink_mbps) if after_first else 0.0
            fwd_path[i] = (p.fwd_fit.at(b), up, leader, rtt)
            bwd_path[i] = rtt + send_s(nbytes, p.downlink_mbps) + p.bwd_fit.at(b)
            bwd_path[i] += send_s(sync_bytes, p.uplink_mbps)
        else:
            down = send_s(nbytes, p.downlink_mbps) if after_first else 0.0
            fwd_path[i] = (p.compute_s(b, backward=after_first), up, down, rtt)
    forward_s = {i: sum(v) for i, v in fwd_path.items()}
    device_s = {i: forward_s[i] + bwd_path.get(i, 0.0) for i in forward_s}
    critical = max(forward_s, key=lambda i: forward_s[i])
    server_s = server_s_per_sample * sum(batch.values())
    sync_s = max(bwd_path.values()) + align_s if bwd_path else 0.0
    c, u, d, rtt = fwd_path[critical]
    return Prediction(
        total_s=forward_s[critical] + server_s + sync_s,
        device_s=device_s,
        critical=critical,
        compute_s=c,
        uplink_s=u + rtt / 2,
        downlink_s=d + rtt / 2,
        server_s=server_s,
        sync_s=sync_s,
    )
