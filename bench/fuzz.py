"""Fuzz a running orchestrator while it trains: every bad frame must close only its own peer.

Starts ``gapsl-orchestrator run`` on a small local fleet, then opens connection after connection
to it and sends fuzzed first frames — random bytes, truncated and bit-flipped valid frames,
hellos with unknown ids or wrong tokens or wrong field types, text frames, oversized frames —
and records the close code of each. The run must complete with exactly the accuracy of the same
manifest run without the fuzzer (training is deterministic in its seed)::

    python -m bench.fuzz [--frames 10000] [--quick]

The last line printed is a JSON object (``frames``, ``close_codes``, ``acc_fuzzed``,
``acc_reference``, ``run_completed``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.protocol import encode
from orchestrator.config.manifest import local_device_toml

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = """
[testbed]
name = "fuzz"
listen = "127.0.0.1:0"
max_message_bytes = 1048576
[training]
rounds = {rounds}
eval_every = 100
seed = 5
"""
for _i in range(3):  # a 30 ms RTT keeps the run going while the fuzzer works
    MANIFEST += local_device_toml(f"dev-{_i}", f"secret-{_i}", rtt_ms=30.0)


def _valid_frames() -> list[bytes]:
    x = np.random.default_rng(0).standard_normal((4, 8), dtype=np.float32)
    return [
        encode("hello", protocol=1, device_id="dev-0", token="wrong", facts={"a": 1}),
        encode("hello", protocol=1, device_id="nobody", token="secret-0", facts={}),
        encode("activations", round=1, x=x, y=np.arange(4), compute_s=0.1),
        encode("eval_result", round=1, weights={"w": x}, compute_s=0.0),
        encode("telemetry", stats={"cpu_percent": 1.0}),
    ]


def fuzzed_frame(rng: random.Random, valid: list[bytes]) -> bytes | str:
    """One hostile first frame. Never a correct hello with a listed id and its token."""
    kind = rng.randrange(8)
    base = bytearray(rng.choice(valid))
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 200)))
    if kind == 1:
        return bytes(base[: rng.randrange(1, len(base))])
    if kind == 2:
        for _ in range(rng.randrange(1, 6)):
            base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
        return bytes(base)
    if kind == 3:
        return "text frames are not the protocol"
    if kind == 4:
        return b"\x00" * (1024 * 1024 + rng.randrange(1, 4096))  # over max_message_bytes
    if kind == 5:
        import msgpack

        fields: dict[str, Any] = {"type": "hello", "protocol": rng.choice([1, 2, "1", None, 1.5]),
                                  "device_id": rng.choice(["dev-1", 7, "", "x" * 300]),
                                  "token": rng.choice(["secret-1x", b"bytes", None]), "facts": rng.choice([{}, [], 3])}  # fmt: skip
        return msgpack.packb(fields, use_bin_type=True)
    if kind == 6:
        return encode(
            "hello",
            protocol=1,
            device_id=f"dev-{rng.randrange(3)}",
            token=f"guess-{rng.random()}",
            facts={},
        )
    return bytes(base) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 16)))


async def _one(url: str, frame: bytes | str) -> int | None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    try:
        async with connect(url, compression=None, max_size=None, open_timeout=20) as ws:
            try:
                await ws.send(frame)
                async with asyncio.timeout(20):
                    async for _ in ws:
                        pass
            except ConnectionClosed:
                pass
            return ws.close_code
    except (OSError, TimeoutError) as exc:
        raise RuntimeError(f"orchestrator stopped answering: {exc}") from exc


async def _run(rounds: int, frames: int | None, work: Path) -> dict[str, Any]:
    manifest = work / "fuzz.toml"
    manifest.write_text(MANIFEST.format(rounds=rounds))
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "run",
        str(manifest),
        "--no-dashboard",
        "--run-dir",
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd, str(work / ("fuzzed" if frames else "reference")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    codes: collections.Counter[Any] = collections.Counter()
    sent = 0
    url = None
    while url is None:
        line = (await proc.stdout.readline()).decode()
        if not line:
            raise RuntimeError("orchestrator exited before listening")
        m = re.search(r"url=(ws://[\d.]+:\d+)", line)
        url = m.group(1) if m else None
    drain = asyncio.create_task(proc.stdout.read())
    if frames:
        rng, valid = random.Random(1), _valid_frames()
        sem = asyncio.Semaphore(8)

        async def worker(frame: bytes | str) -> None:
            nonlocal sent
            async with sem:
                codes[await _one(url, frame)] += 1
                sent += 1

        await asyncio.gather(*(worker(fuzzed_frame(rng, valid)) for _ in range(frames)))
    rc = await proc.wait()
    await drain
    run_dir = work / ("fuzzed" if frames else "reference")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"rc": rc, "summary": summary, "sent": sent, "codes": dict(codes)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    frames, rounds = (200, 100) if args.quick else (args.frames, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        fuzzed = asyncio.run(_run(rounds, frames, Path(tmp)))
        reference = asyncio.run(_run(rounds, None, Path(tmp)))
    out = {
        "frames": fuzzed["sent"],
        "close_codes": {
            str(k): v for k, v in sorted(fuzzed["codes"].items(), key=lambda kv: str(kv[0]))
        },
        "run_completed": fuzzed["summary"]["status"] == "completed" and fuzzed["rc"] == 0,
        "acc_fuzzed": fuzzed["summary"]["final_acc_mean"],
        "acc_reference": reference["summary"]["final_acc_mean"],
    }
    print(f"{out['frames']} fuzzed frames; close codes {out['close_codes']}")
    print(
        f"run with fuzzing: {fuzzed['summary']['status']}, acc {out['acc_fuzzed']}; without: {out['acc_reference']}"
    )
    print(json.dumps(out))
    return 0 if out["run_completed"] and out["acc_fuzzed"] == out["acc_reference"] else 1


if __name__ == "__main__":
    sys.exit(main())
