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
# The small compute benchmark's batch is the large one's divided by this: far enough apart that
# the slope between them is not timer noise, the small one close enough to 0 to pin the fixed cost.
PROBE_SMALL_DIVISOR = 8
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
    # Compute at two batch sizes: a step costs a fixed part plus a part per sample, and one
    # size alone would book the fixed part as per-sample cost.
    fwd: list[tuple[int, float]] = []
    bwd: list[tuple[int, float]] = []
    for b in bench_batches(batch):
        seq += 1
        reply = await s.call(
            encode("bench", seq=seq, batch_size=b, repeats=PROBE_BENCH_REPEATS),
            "bench_result",
            seq,
            timeout_s,
            key="seq",
        )
        fwd.append((b, float(reply["fwd_s"])))
        bwd.append((b, float(reply["bwd_s"])))
    return DeviceProfile.from_bench(
        fwd, bwd, rtt_ms=rtt_ms, jitter_ms=jitter_ms, uplink_mbps=up_mbps, downlink_mbps=down_mbps
    )


def bench_batches(batch: int) -> tuple[int, int]:
    """The compute probe's two batch sizes: ``batch`` and an eighth of it (at least 1)."""
    return max(1, batch // PROBE_SMALL_DIVISOR), batch
