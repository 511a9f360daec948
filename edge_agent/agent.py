"""The agent's connection loop: dial, authenticate, take the job, train rounds, reconnect on loss.

Messages are handled one at a time in arrival order, so a gradient is always applied before the
next round's forward pass. Torch work runs in a worker thread: the websockets keepalive keeps
answering pings while a slow device computes.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol
from .checkpoint import CheckpointStore
from .compress import CompressionError, pack, unpack
from .emulation import EmulationProfile, LinkShaper, pad_compute
from .protocol import ProtocolError, decode, encode
from .telemetry import device_facts, live_stats

log = logging.getLogger("edge_agent")


_PROTOCOL_CLOSES = {
    protocol.CLOSE_PROTOCOL_ERROR,
    protocol.CLOSE_UNSUPPORTED_DATA,
    protocol.CLOSE_INVALID_PAYLOAD,
    protocol.CLOSE_MESSAGE_TOO_BIG,
}


class AgentExit(enum.IntEnum):
    """Exit codes of ``gapsl-agent``."""

    OK = 0  # the run ended and the orchestrator said bye
    FAILED = 1  # the job could not be carried out (data missing, model mismatch, ...)
    USAGE = 2  # bad command line
    REFUSED = 3  # the orchestrator refused this device (unknown id or wrong token)
    UNREACHABLE = 4  # no orchestrator answered within --give-up-s
    INTERRUPTED = 130


@dataclass
class AgentConfig:
    url: str
    device_id: str
    token: str
    data_dir: Path | None = None
    download: bool = False
    device: str = "auto"
    emulation: EmulationProfile = field(default_factory=EmulationProfile)
    max_message_bytes: int = 256 * 1024 * 1024
    open_timeout_s: float = 10.0
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 30.0
    give_up_s: float = 300.0  # stop redialling after this long without an orchestrator
    ca_file: Path | None = None  # wss://: trust only this CA; None = the system store
    telemetry_every_s: float = 2.0
    checkpoint_dir: Path | None = None  # local checkpoints of the client partition; None = off


class JobFailed(Exception):
    """The job cannot run on this device; the reason goes to the orchestrator and the log."""


class Agent:
    """One device's agent. ``await Agent(cfg).run()`` returns an :class:`AgentExit`."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self.trainer: Any = None
        self._last_activations: tuple[int, bytes] | None = None
        self._last_client_grad: tuple[int, bytes] | None = None
        self._backward_s: float | None = None
        self._up = LinkShaper(cfg.emulation.uplink_mbps, cfg.emulation.rtt_ms)
        self._down = LinkShaper(cfg.emulation.downlink_mbps, cfg.emulation.rtt_ms)
        self.checkpoints = (
            CheckpointStore(cfg.checkpoint_dir, cfg.device_id) if cfg.checkpoint_dir else None
        )

    async def run(self) -> AgentExit:
        """Dial until the run ends; redial with jittered exponential backoff after a drop.

        Cancelling is safe: the connection closes and nothing is left running.
        """
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

        from .tlsctx import TlsConfigError, client_ssl_context, describe_tls_failure

        try:
            ssl_context = client_ssl_context(self.cfg.ca_file, self.cfg.url)
        except TlsConfigError as exc:
            log.error("%s", exc)
            return AgentExit.USAGE
        last_contact = time.monotonic()
        delay = 0.5
        while True:
            try:
                async with (
                    connect(
                        self.cfg.url,
                        compression=None,  # activations are dense floats: deflate costs CPU, saves ~nothing
                        max_size=self.cfg.max_message_bytes,
                        open_timeout=self.cfg.open_timeout_s,
                        ping_interval=self.cfg.ping_interval_s,
                        ping_timeout=self.cfg.ping_timeout_s,
                        close_timeout=5,
                        ssl=ssl_context,
                    ) as ws
                ):
                    delay = 0.5
                    last_contact = time.monotonic()
                    result = await self._session(ws)
                    if result is not None:
                        return result
            except InvalidURI as exc:
                log.error("bad orchestrator URL: %s", exc)
                return AgentExit.USAGE
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if code == protocol.CLOSE_POLICY_VIOLATION:
                    log.error("refused by the orchestrator: %s", reason)
                    return AgentExit.REFUSED
                log.warning("connection closed (%s %s); redialling", code, reason)
                # A protocol complaint is no sign of a healthy orchestrator: let --give-up-s run.
                if code not in _PROTOCOL_CLOSES:
                    last_contact = time.monotonic()
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                hint = describe_tls_failure(exc)
                if hint is not None:  # keep redialling: a clock set late by NTP recovers
                    log.error("%s: %s", self.cfg.url, hint)
                else:
                    log.warning("cannot reach %s: %s", self.cfg.url, exc or type(exc).__name__)
            else:
                last_contact = time.monotonic()
            if time.monotonic() - last_contact > self.cfg.give_up_s:
                log.error("no orchestrator for %.0f s; giving up", self.cfg.give_up_s)
                return AgentExit.UNREACHABLE
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 10.0)

    async def _session(self, ws: Any) -> AgentExit | None:
        """One connection; returns an exit code to stop, or None to redial."""
        resume = None
        if self.trainer is not None and self.run_id is not None:
            resume = {"run_id": self.run_id, "round": self.trainer.applied_round}
        facts = device_facts(self.trainer.device.type if self.trainer is not None else "")
        await self._send(
            ws,
            encode(
                "hello",
                protocol=protocol.PROTOCOL_VERSION,
                device_id=self.cfg.device_id,
                token=self.cfg.token,
                facts=facts,
                resume=resume,
            ),
        )
        # A reader task stamps each frame's arrival, so the emulated downlink delays frames from
        # when they reached this device, not from when a busy handler got round to them.
        inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
        telemetry = asyncio.create_task(self._telemetry(ws), name="telemetry")
        reader = asyncio.create_task(self._read(ws, inbox), name="reader")
        try:
            while True:
                item = await inbox.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                arrived, frame = item
                await self._down.pass_frame(len(frame), arrived)
                try:
                    msg = decode(frame, protocol.ORCHESTRATOR_TYPES)
                except ProtocolError as exc:
                    log.error("bad frame from the orchestrator: %s", exc.reason)
                    await ws.close(exc.code, exc.reason[:120])
                    return AgentExit.FAILED
                try:
                    result = await self._handle(ws, msg)
                except JobFailed as exc:
                    log.error("job failed: %s", exc)
                    await self._send(ws, encode("error", code="job_failed", message=str(exc)))
                    await ws.close(protocol.CLOSE_NORMAL, "job failed")
                    return AgentExit.FAILED
                if result is not None:
                    return result
        finally:
            telemetry.cancel()
            reader.cancel()
            # return_exceptions collects the tasks' own CancelledError (or ConnectionClosed);
            # a cancellation of this coroutine still propagates.
            await asyncio.gather(telemetry, reader, return_exceptions=True)
        return None

    @staticmethod
    async def _read(ws: Any, inbox: asyncio.Queue[Any]) -> None:
        """Frames with their arrival time; then None (clean close) or the closing exception."""
        from websockets.exceptions import ConnectionClosed

        try:
            async for frame in ws:
                await inbox.put((time.monotonic(), frame))
        except ConnectionClosed as exc:
            await inbox.put(exc)
            return
        await inbox.put(None)

    async def _send(self, ws: Any, frame: bytes) -> None:
        await self._up.pass_frame(len(frame))
        await ws.send(frame)

    async def _telemetry(self, ws: Any) -> None:
        while True:
            await asyncio.sleep(self.cfg.telemetry_every_s)
            stats = await asyncio.to_thread(live_stats)
            await ws.send(encode("telemetry", stats=stats))

    async def _handle(self, ws: Any, msg: protocol.Message) -> AgentExit | None:
        kind = msg.type
        if kind == "job":
            await self._take_job(ws, msg)
        elif kind == "round":
            await self._forward(ws, msg["round"], msg["batch_size"])
        elif kind == "gradients":
            await self._backward(ws, msg)
        elif kind == "align":
            trainer = self._trainer()
            if trainer._held == msg["round"]:  # a resent alignment already applied is ignored
                seconds = await asyncio.to_thread(
                    trainer.align, msg["round"], msg["leader"], msg["mode"], msg["lam"]
                )
                await asyncio.to_thread(pad_compute, seconds, self.cfg.emulation.compute_slowdown)
        elif kind == "echo":
            size = msg.get("reply_bytes")
            payload = msg["payload"] if size is None else np.zeros(size, dtype=np.uint8)
            await self._send(ws, encode("echo_reply", seq=msg["seq"], payload=payload))
        elif kind == "bench":
            fwd_s, bwd_s = await asyncio.to_thread(
                self._trainer().benchmark, msg["batch_size"], msg["repeats"]
            )
            # On this device's clock a batch costs slowdown times the work, as pad_compute makes
            # every real round cost; the benchmark reports that figure without sleeping it out.
            slow = self.cfg.emulation.compute_slowdown
            await self._send(
                ws, encode("bench_result", seq=msg["seq"], fwd_s=fwd_s * slow, bwd_s=bwd_s * slow)
            )
        elif kind == "skip":
            self._trainer().skip(msg["round"])
        elif kind == "set_weights":
            await asyncio.to_thread(self._trainer().set_weights, msg["weights"])
        elif kind == "eval_request":
            self._trainer()
            start = time.perf_counter()
            weights = await asyncio.to_thread(self.trainer.weights)
            if msg.get("checkpoint"):
                await asyncio.to_thread(self._save_checkpoint, msg["round"])
            frame = encode(
                "eval_result",
                round=msg["round"],
                weights=weights,
                compute_s=time.perf_counter() - start,
            )
            await self._send(ws, frame)
        elif kind == "error":
            log.error("orchestrator reports %s: %s", msg["code"], msg["message"])
        elif kind == "bye":
            log.info("run over: %s", msg["reason"])
            await ws.close(protocol.CLOSE_NORMAL, "bye")
            if msg.get("redial"):  # an interrupted run that may be resumed: wait for it
                return None
            return AgentExit.OK
        return None

    async def _take_job(self, ws: Any, msg: protocol.Message) -> None:
        job = dict(msg["job"])
        start = time.perf_counter()
        try:
            self.trainer = await asyncio.to_thread(
                self._build_trainer, job, msg["shard"], msg["weights"]
            )
        except JobFailed:
            raise
        except Exception as exc:  # any failure to build the job is reported, not crashed on
            raise JobFailed(f"{type(exc).__name__}: {exc}") from exc
        self.run_id = msg["run_id"]
        self._last_activations = None
        self._last_client_grad = None
        restored = await asyncio.to_thread(self._restore, int(job.get("resume_round", 0)))
        log.info(
            "job %s: %s/%s, %d samples",
            self.run_id,
            job["model"],
            job["cut"],
            self.trainer.shard_size,
        )
        await self._send(
            ws,
            encode(
                "ready",
                shard_size=self.trainer.shard_size,
                load_s=time.perf_counter() - start,
                torch_device=self.trainer.device.type,
                restored_round=restored,
            ),
        )

    def _save_checkpoint(self, round_: int) -> None:
        if self.checkpoints is None or self.run_id is None:
            return
        try:
            self.checkpoints.save(self.run_id, round_, self.trainer.checkpoint())
        except OSError as exc:  # a full or read-only disk must not stop the run
            log.warning("cannot write a checkpoint: %s", exc)

    def _restore(self, resume_round: int) -> int | None:
        """Carry on from a local checkpoint of this run, if there is a fitting one.

        ``resume_round`` > 0: the orchestrator resumes from that round, so only that round's
        checkpoint fits; without one the job's weights (the orchestrator's copy of this
        partition at that round) stand, with a fresh optimizer. 0: the newest checkpoint of the
        run, which is what a device that restarted mid-run wants. Returns the restored round.
        """
        trainer, store = self.trainer, self.checkpoints
        assert self.run_id is not None
        state = None
        if store is not None:
            state = store.load(self.run_id, resume_round or None)
            if resume_round:
                store.drop_after(self.run_id, resume_round)
        if state is not None:
            try:
                trainer.restore(state)
            except (RuntimeError, KeyError, ValueError) as exc:
                log.warning("checkpoint of round %s does not fit the job: %s", state["round"], exc)
                state = None
        if state is None:
            trainer.applied_round = resume_round
            return None
        log.info("resumed from the local checkpoint of round %d", state["round"])
        return int(state["round"])

    def _build_trainer(self, job: dict[str, Any], shard: Any, weights: Any) -> Any:
        from .data import DataError, labels_fingerprint, load_dataset
        from .trainer import ClientTrainer

        try:
            ds = load_dataset(job["dataset"], self.cfg.data_dir, download=self.cfg.download)
        except DataError as exc:
            raise JobFailed(str(exc)) from exc
        if labels_fingerprint(ds.y_train) != job["dataset_fingerprint"]:
            raise JobFailed(
                f"the local copy of {job['dataset']} differs from the orchestrator's "
                "(label fingerprints disagree): point --data-dir at the same dataset files"
            )
        if len(shard) and int(shard.max()) >= len(ds.y_train):
            raise JobFailed("shard indices out of range for the local dataset")
        return ClientTrainer(
            job, shard, weights, ds.x_train, ds.y_train, ds.normalize, self.cfg.device
        )

    def _trainer(self) -> Any:
        if self.trainer is None:
            raise JobFailed("a training message arrived before the job")
        return self.trainer

    async def _backward(self, ws: Any, msg: protocol.Message) -> None:
        trainer, r = self._trainer(), msg["round"]
        hold = bool(msg.get("hold", False))
        if self._last_client_grad is not None and self._last_client_grad[0] == r:
            await self._send(ws, self._last_client_grad[1])  # a repeated request after a redial
            return
        if r <= trainer.applied_round:
            return  # a resent gradient that was already applied
        if not trainer.has_forward(r):
            # resent after this device restarted from a checkpoint: that forward pass is gone
            log.info("dropping the gradient of round %d: no forward pass of it here", r)
            if hold:  # the orchestrator waits for a reply: say this round is lost here
                await self._send(ws, encode("missed", round=r))
            return
        try:
            grad = await asyncio.to_thread(
                unpack, msg["grad"], msg.get("grad_scale"), trainer.compression
            )
        except CompressionError as exc:
            raise JobFailed(f"the gradient of round {r}: {exc}") from exc
        flat, seconds = await asyncio.to_thread(trainer.backward, r, grad, hold)
        await asyncio.to_thread(pad_compute, seconds, self.cfg.emulation.compute_slowdown)
        self._backward_s = seconds * self.cfg.emulation.compute_slowdown
        if flat is not None:
            seconds *= self.cfg.emulation.compute_slowdown
            frame = encode("client_grad", round=r, grad=flat, compute_s=seconds)
            self._last_client_grad = (r, frame)
            await self._send(ws, frame)

    async def _forward(self, ws: Any, round_: int, batch_size: int) -> None:
        self._trainer()
        # After a reconnect the orchestrator re-asks; answer with the same batch, not a new one.
        if self._last_activations is not None and self._last_activations[0] == round_:
            await self._send(ws, self._last_activations[1])
            return
        trainer = self.trainer

        def forward() -> tuple[Any, float | None, Any, float]:
            acts, labels, seconds = trainer.forward(round_, batch_size)
            return (*pack(acts, trainer.compression), labels, seconds)  # as the job's codec says

        try:
            x, x_scale, labels, seconds = await asyncio.to_thread(forward)
        except CompressionError as exc:  # a diverged partition: NaN, or beyond float16
            raise JobFailed(f"the activations of round {round_}: {exc}") from exc
        await asyncio.to_thread(pad_compute, seconds, self.cfg.emulation.compute_slowdown)
        seconds *= self.cfg.emulation.compute_slowdown
        frame = encode(
            "activations",
            round=round_,
            x=x,
            x_scale=x_scale,
            y=labels,
            compute_s=seconds,
            backward_s=self._backward_s,
        )
        self._last_activations = (round_, frame)
        await self._send(ws, frame)
