"""The profiler's probe of one device: RTT by echo, link rates both ways, a compute benchmark.

What it measures becomes the device's :class:`~orchestrator.training.latency.DeviceProfile`,
from which the scheduler plans batches and the latency model predicts round times.
"""

from __future__ import annotations

import time

import numpy as np

from edge_agent.protocol import encode
from orchestrator.fleet.sessions import DeviceSession
from orchestrator.training.latency import DeviceProfile, link_from_samples

# Payloads large enough that transfer time dominates timer and scheduling noise.
PROBE_MIN_BYTES = 512 * 1024
# The compute benchmark's batch at least this big, so per-sample times are not call overhead.
PROBE_MIN_BATCH = 64
# Echoes timed for the RTT (after one warm-up), and transfers timed each way for the rates: the
# median of a few resists one-off scheduler hiccups without making the probe itself slow.
PROBE_RTT_SAMPLES = 7
PROBE_RATE_SAMPLES = 3
PROBE_BENCH_REPEATS = 5  # forward/backward repeats the device times in its compute benchmark
PROBE_ECHO_BYTES = 16  # an RTT echo: a payload small enough to cost no transfer time


async def probe(s: DeviceSession, act_bytes: int, batch: int, timeout_s: float) -> DeviceProfile:
    """RTT by echo, then activation-sized payloads down and up, then a compute benchmark.

    Every request is bounded by ``timeout_s`` (``testbed.round_timeout_s``). Cancelling is safe.
    """
    seq = 0

    async def echo(payload: int, reply: int | None) -> float:
        nonlocal seq
        seq += 1
        frame = encode("echo", seq=seq, payload=np.zeros(payload, np.uint8), reply_bytes=reply)
        t0 = time.perf_counter()
        await s.call(frame, "echo_reply", seq, timeout_s, key="seq")
        return time.perf_counter() - t0

    await echo(PROBE_ECHO_BYTES, None)  # warm-up: first frames pay for buffers and code paths
    rtts = [await echo(PROBE_ECHO_BYTES, None) for _ in range(PROBE_RTT_SAMPLES)]
    down = [(act_bytes, await echo(act_bytes, 0)) for _ in range(PROBE_RATE_SAMPLES)]
    up = [(act_bytes, await echo(0, act_bytes)) for _ in range(PROBE_RATE_SAMPLES)]
    rtt_ms, jitter_ms, down_mbps, up_mbps = link_from_samples(rtts, down, up)
    seq += 1
    reply = await s.call(
        encode("bench", seq=seq, batch_size=batch, repeats=PROBE_BENCH_REPEATS),
        "bench_result",
        seq,
        timeout_s,
        key="seq",
    )
    return DeviceProfile(
        fwd_ms_per_sample=1000.0 * float(reply["fwd_s"]) / batch,
        bwd_ms_per_sample=1000.0 * float(reply["bwd_s"]) / batch,
        rtt_ms=rtt_ms, jitter_ms=jitter_ms, uplink_mbps=up_mbps, downlink_mbps=down_mbps,
    )  # fmt: skip
