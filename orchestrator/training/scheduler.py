"""The scheduler: who takes part in each round, with which batch sizes, and its deadline.

It plans from the devices' measured profiles (``latency.py``): ``scheduler.policy`` uniform or
latency_balanced, ``scheduler.participation`` (a seeded sample each round) and
``scheduler.deadline_factor``; it keeps the server's time per sample that the latency model adds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from orchestrator.config.manifest import Manifest
from orchestrator.training.devices import ForwardOut
from orchestrator.training.latency import DeviceProfile, Prediction, ema, predict_round, send_s

PARTICIPATION_STREAM = 0x5C4ED  # the participation RNG's stream, apart from every other draw


class Planner:
    """Plans each round and learns from it: the device profiles and the server's cost."""

    def __init__(
        self, m: Manifest, pooled: bool, wire_ratio: float, sync_bytes: float = 0.0
    ) -> None:
        self.m, self.pooled, self.wire_ratio = m, pooled, wire_ratio
        self.profiles: dict[str, DeviceProfile] = {}  # filled by the probe; empty in simulate
        self.act_bytes_per_sample = 0.0  # in the wire codec; set with the profiles
        self.server_s_per_sample = 0.0
        # GAPSL's client space: the client gradient's bytes (up, and the leader down) and the
        # server's alignment time, the round's second trip; 0 for rules without it
        self.sync_bytes = sync_bytes
        self.align_s = 0.0
        self.rng = np.random.default_rng([m.training.seed, PARTICIPATION_STREAM])
        self.last_batch: dict[str, int] = {}  # each device's previous batch: its next backward's

    def plan(self, r: int, ids: list[str]) -> tuple[list[str], dict[str, int], Prediction | None]:
        """Who takes part in round r, with which batch sizes, and the predicted round time."""
        m, sc = self.m, self.m.scheduler
        if sc.participation < 1.0:
            ids = sample_participants(ids, sc.participation, sc.min_participants, self.rng)
        b = m.training.batch_size
        if self.pooled:  # the pooled-data ceiling takes everyone's batch at once
            return ids, {i: b * len(m.devices) for i in ids}, None
        batch = {i: b for i in ids}
        if sc.policy == "latency_balanced" and self.profiles:
            # The floor keeps a slow device's partition learning, and its shard in use at all.
            batch = balance_batches(
                {i: self.profiles[i] for i in ids},
                b * len(ids),
                self.act_bytes_per_sample,
                max(1, int(b * sc.min_batch_fraction)),
                self.sync_bytes,
            )
        predicted = None
        if self.profiles:
            predicted = predict_round(
                self.profiles,
                batch,
                self.act_bytes_per_sample,
                self.server_s_per_sample,
                after_first=r > 1,
                sync_bytes=self.sync_bytes,
                align_s=self.align_s,
            )
        return ids, batch, predicted

    def step_scales(self, batch: Mapping[str, int]) -> dict[str, float]:
        """The factor on each device's activation gradient: b_i / batch_size for a device
        planned below ``training.batch_size`` (``scheduler.step_scaling = "linear"``), so it
        steps lr * b_i / batch_size; devices at or above it are not listed (factor 1).

        A device's gradient is that of its own mean loss, so a quarter batch would otherwise
        take a full step on a quarter of the samples: four times the noise per sample seen.
        Scaled, each sample moves a partition as far as under uniform batches (the linear
        scaling rule of large-batch SGD, read downwards). What travels is the scaled gradient;
        uniform batches are untouched, bit for bit.
        """
        if self.m.scheduler.step_scaling != "linear":
            return {}
        b = self.m.training.batch_size
        return {i: n / b for i, n in batch.items() if 0 < n < b}

    def deadline_s(self, r: int, predicted: Prediction | None) -> float | None:
        """How long round r waits for activations; None waits for everyone."""
        factor = self.m.scheduler.deadline_factor
        if predicted is None or factor <= 0 or r == 1:
            return None
        return factor * predicted.total_s

    def observe(
        self, r: int, fwd: Mapping[str, ForwardOut], server_s: float, align_s: float = 0.0
    ) -> None:
        """Refine the server's cost and every device's profile from round r's real timings."""
        total = sum(len(f.labels) for f in fwd.values())
        self.align_s = ema(self.align_s, align_s) if self.sync_bytes > 0 else 0.0
        self.server_s_per_sample = ema(self.server_s_per_sample, server_s / total)
        for i, f in fwd.items():
            p = self.profiles.get(i)
            if p is None:
                continue
            b = len(f.labels)
            # the backward reported with round r's activations is that of round r-1's gradient
            p.update_compute(f.compute_s, f.backward_s, b, self.last_batch.get(i))
            self.last_batch[i] = b
            if self.sync_bytes > 0:
                # the client space: the backward and its gradient were the previous round's
                # second trip; only the leader came down on this path (from round 2 on)
                path = f.wait_s - f.compute_s
                down_bytes = int(self.sync_bytes) if r > 1 else 0
            else:
                path = f.wait_s - f.compute_s - (f.backward_s or 0.0)
                # from round 2 on, the previous gradient came down on the same path
                down_bytes = int(f.acts.nbytes * self.wire_ratio) if r > 1 else 0
            p.update_uplink(f.nbytes, path, down_bytes)

    def state_dict(self) -> dict[str, Any]:
        return {
            "participation_rng": self.rng.bit_generator.state,
            "server_s_per_sample": self.server_s_per_sample,
            "align_s": self.align_s,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rng.bit_generator.state = dict(state["participation_rng"])
        self.server_s_per_sample = float(state["server_s_per_sample"])
        self.align_s = float(state.get("align_s", 0.0))  # absent in older checkpoints


def balance_batches(
    profiles: Mapping[str, DeviceProfile],
    total: int,
    act_bytes_per_sample: float,
    min_batch: int = 1,
    sync_bytes: float = 0.0,
) -> dict[str, int]:
    """Per-device batch sizes that equalise predicted arrival, summing to ``total``.

    Device i's path is c_i + b_i * k_i with c_i its fixed cost (RTT plus the fixed compute cost
    of a forward and a backward; in GAPSL's client space, ``sync_bytes`` > 0, a second RTT and
    the client gradient up and the leader down, which no batch size shrinks) and k_i its
    per-sample cost (compute plus both transfers);
    equal paths T give b_i = (T - c_i) / k_i with sum b_i = total. Devices that
    would get less than ``min_batch`` are pinned there and the rest re-solved; the result is
    rounded by largest remainder so the total is exact.
    """
    ids = list(profiles)
    if total < min_batch * len(ids):
        raise ValueError(
            f"a total batch of {total} cannot give {len(ids)} devices {min_batch} each"
        )
    k, rtt = {}, {}
    for i in ids:
        p = profiles[i]
        links = (p.uplink_mbps, p.downlink_mbps)
        per = p.compute_ms_per_sample / 1000.0 + sum(send_s(act_bytes_per_sample, v) for v in links)
        k[i] = max(per, 1e-9)
        rtt[i] = (p.rtt_ms + p.compute_fixed_ms) / 1000.0
        if sync_bytes > 0:
            rtt[i] += p.rtt_ms / 1000.0 + sum(send_s(sync_bytes, v) for v in links)
    pinned: set[str] = set()
    while True:
        free = [i for i in ids if i not in pinned]
        budget = total - min_batch * len(pinned)
        t = (budget + sum(rtt[i] / k[i] for i in free)) / sum(1.0 / k[i] for i in free)
        raw = {i: (t - rtt[i]) / k[i] for i in free}
        low = [i for i in free if raw[i] < min_batch]
        if not low:
            break
        pinned.update(low)
    sizes = {i: float(min_batch) for i in pinned} | raw
    floors = {i: int(math.floor(v)) for i, v in sizes.items()}
    short = total - sum(floors.values())
    for i in sorted(ids, key=lambda i: (floors[i] - sizes[i], i))[:short]:
        floors[i] += 1
    return floors


def sample_participants(
    ids: list[str], fraction: float, minimum: int, rng: np.random.Generator
) -> list[str]:
    """Partial participation: a seeded random subset of ``ceil(fraction * N)`` devices (order kept)."""
    n = max(minimum, math.ceil(fraction * len(ids)))
    if n >= len(ids):
        return list(ids)
    chosen = set(rng.choice(len(ids), size=n, replace=False).tolist())
    return [i for k, i in enumerate(ids) if k in chosen]
