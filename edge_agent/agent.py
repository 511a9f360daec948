"""The agent's connection loop: dial, authenticate, take the job, train rounds, reconnect on loss.

Messages are handled one at a time in arrival order, so a gradient is always applied before the
next round's forward pass. Torch work runs in a worker thread: the websockets keepalive keeps
answering pings while a slow device computes. Frames go through :class:`~edge_agent.link.Link`,
which bounds every send and receive; taking a job is :mod:`edge_agent.jobload`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from . import jobload, protocol
from .checkpoint import CheckpointStore
from .compress import pack, unpack
from .config import REDIAL_FIRST_S, REDIAL_JITTER, REDIAL_MAX_S, AgentConfig
from .emulation import LinkShaper, pad_compute
from .errors import CompressionError, JobFailed, JobSpecError, LinkTimeout, ProtocolError
from .jobspec import JobSpec
from .link import Link
from .protocol import decode, encode
from .telemetry import device_facts

if TYPE_CHECKING:
    from .trainer import ClientTrainer

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


class Agent:
    """One device's agent. ``await Agent(cfg).run()`` returns an :class:`AgentExit`."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.run_id: str | None = None
        self.trainer: ClientTrainer | None = None
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

        from .arrival import StampedConnection
        from .errors import TlsConfigError
        from .tlsctx import client_ssl_context, describe_tls_failure

        try:
            ssl_context = client_ssl_context(self.cfg.ca_file, self.cfg.url)
        except TlsConfigError as exc:
            log.error("%s", exc)
            return AgentExit.USAGE
        last_contact = time.monotonic()
        delay = REDIAL_FIRST_S
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
                        close_timeout=self.cfg.close_timeout_s,
                        ssl=ssl_context,
                        create_connection=StampedConnection,  # the downlink's first bytes
                    ) as ws
                ):
                    delay = REDIAL_FIRST_S
                    last_contact = time.monotonic()
                    link = Link(ws, self.cfg, self._up, self._down)
                    try:
                        result = await self._session(link)
                    except LinkTimeout as exc:  # a stalled or silent link: going away
                        await link.close(protocol.CLOSE_GOING_AWAY, str(exc))
                        raise
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
            except LinkTimeout as exc:  # before OSError/TimeoutError: it is a TimeoutError too
                log.warning("%s; redialling", exc)
                last_contact = time.monotonic()  # the link worked until it stalled
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
            await asyncio.sleep(delay * random.uniform(REDIAL_JITTER, 1.0))
            delay = min(delay * 2, REDIAL_MAX_S)

    async def _session(self, link: Link) -> AgentExit | None:
        """One connection; returns an exit code to stop, or None to redial.

        Raises LinkTimeout when a send or the wait for a frame runs past its bound, and the
        connection's own ConnectionClosed.
        """
        resume = None
        if self.trainer is not None and self.run_id is not None:
            resume = {"run_id": self.run_id, "round": self.trainer.applied_round}
        facts = device_facts(self.trainer.device.type if self.trainer is not None else "")
        await link.send(
            encode(
                "hello",
                protocol=protocol.PROTOCOL_VERSION,
                device_id=self.cfg.device_id,
                token=self.cfg.token,
                facts=facts,
                resume=resume,
            ),
        )
        telemetry = asyncio.create_task(link.telemetry(), name="telemetry")
        reader = asyncio.create_task(link.read(), name="reader")
        try:
            while (frame := await link.receive()) is not None:
                try:
                    msg = decode(frame, protocol.ORCHESTRATOR_TYPES)
                except ProtocolError as exc:
                    log.error("bad frame from the orchestrator: %s", exc.reason)
                    await link.close(exc.code, exc.reason)
                    return AgentExit.FAILED
                try:
                    result = await self._handle(link, msg)
                except JobFailed as exc:
                    log.error("job failed: %s", exc)
                    await link.send(encode("error", code="job_failed", message=str(exc)))
                    await link.close(protocol.CLOSE_NORMAL, "job failed")
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

    async def _handle(self, link: Link, msg: protocol.Message) -> AgentExit | None:
        kind = msg.type
        if kind == "job":
            await self._take_job(link, msg)
        elif kind == "round":
            await self._forward(link, msg["round"], msg["batch_size"])
        elif kind == "gradients":
            await self._backward(link, msg)
        elif kind == "align":
            trainer = self._trainer()
            if trainer._held == msg["round"]:  # a resent alignment already applied is ignored

                def align() -> None:  # the step and its emulated padding in one thread hop
                    seconds = trainer.align(msg["round"], msg["leader"], msg["mode"], msg["lam"])
                    pad_compute(seconds, self.cfg.emulation)

                await asyncio.to_thread(align)
        elif kind == "echo":
            size = msg.get("reply_bytes")
            payload = msg["payload"] if size is None else np.zeros(size, dtype=np.uint8)
            await link.send(encode("echo_reply", seq=msg["seq"], payload=payload))
        elif kind == "bench":
            fwd_s, bwd_s = await asyncio.to_thread(
                self._trainer().benchmark, msg["batch_size"], msg["repeats"]
            )
            # On this device's clock a step costs what pad_compute makes every real round cost;
            # the benchmark reports that figure without sleeping it out.
            em = self.cfg.emulation
            await link.send(
                encode("bench_result", seq=msg["seq"], fwd_s=em.compute_s(fwd_s),
                       bwd_s=em.compute_s(bwd_s))
            )  # fmt: skip
        elif kind == "skip":
            self._trainer().skip(msg["round"])
        elif kind == "set_weights":
            await asyncio.to_thread(self._trainer().set_weights, msg["weights"])
        elif kind == "eval_request":
            trainer = self._trainer()
            start = time.perf_counter()
            weights = await asyncio.to_thread(trainer.weights)
            if msg.get("checkpoint") and self.run_id is not None:
                await asyncio.to_thread(
                    jobload.save_checkpoint, trainer, self.checkpoints, self.run_id, msg["round"]
                )
            compute_s = time.perf_counter() - start
            await link.send(
                encode("eval_result", round=msg["round"], weights=weights, compute_s=compute_s)
            )
        elif kind == "error":
            log.error("orchestrator reports %s: %s", msg["code"], msg["message"])
        elif kind == "bye":
            log.info("run over: %s", msg["reason"])
            await link.close(protocol.CLOSE_NORMAL, "bye")
            if msg.get("redial"):  # an interrupted run that may be resumed: wait for it
                return None
            return AgentExit.OK
        return None

    async def _take_job(self, link: Link, msg: protocol.Message) -> None:
        try:
            spec = JobSpec.from_wire(msg["job"])
        except JobSpecError as exc:  # refused like any other job this device cannot run
            raise JobFailed(str(exc)) from exc
        start = time.perf_counter()
        try:
            trainer = await asyncio.to_thread(
                jobload.build_trainer, spec, msg["shard"], msg["weights"], self.cfg
            )
        except JobFailed:
            raise
        except Exception as exc:  # any failure to build the job is reported, not crashed on
            raise JobFailed(f"{type(exc).__name__}: {exc}") from exc
        self.trainer = trainer
        self.run_id = run_id = msg["run_id"]
        self._last_activations = None
        self._last_client_grad = None
        restored = await asyncio.to_thread(
            jobload.restore, trainer, self.checkpoints, run_id, spec.resume_round
        )
        log.info("job %s: %s/%s, %d samples", run_id, spec.model, spec.cut, trainer.shard_size)
        await link.send(
            encode(
                "ready",
                shard_size=trainer.shard_size,
                load_s=time.perf_counter() - start,
                torch_device=trainer.device.type,
                restored_round=restored,
            ),
        )

    def _trainer(self) -> ClientTrainer:
        if self.trainer is None:
            raise JobFailed("a training message arrived before the job")
        return self.trainer

    async def _backward(self, link: Link, msg: protocol.Message) -> None:
        trainer, r = self._trainer(), msg["round"]
        hold = bool(msg.get("hold", False))
        if self._last_client_grad is not None and self._last_client_grad[0] == r:
            await link.send(self._last_client_grad[1])  # a repeated request after a redial
            return
        if r <= trainer.applied_round:
            return  # a resent gradient that was already applied
        if not trainer.has_forward(r):
            # resent after this device restarted from a checkpoint: that forward pass is gone
            log.info("dropping the gradient of round %d: no forward pass of it here", r)
            if hold:  # the orchestrator waits for a reply: say this round is lost here
                await link.send(encode("missed", round=r))
            return

        def backward() -> tuple[Any, float]:  # one thread hop for the step (each is ~0.2 ms)
            try:
                grad = unpack(msg["grad"], msg.get("grad_scale"), trainer.compression)
            except CompressionError as exc:
                raise JobFailed(f"the gradient of round {r}: {exc}") from exc
            flat, seconds = trainer.backward(r, grad, hold)
            return flat, pad_compute(seconds, self.cfg.emulation)

        flat, seconds = await asyncio.to_thread(backward)
        self._backward_s = seconds
        if flat is not None:
            frame = encode(
                "client_grad", round=r, grad=flat, compute_s=seconds,
                aligned=trainer.aligned_report(),
            )  # fmt: skip
            self._last_client_grad = (r, frame)
            await link.send(frame)

    async def _forward(self, link: Link, round_: int, batch_size: int) -> None:
        trainer = self._trainer()
        # After a reconnect the orchestrator re-asks; answer with the same batch, not a new one.
        if self._last_activations is not None and self._last_activations[0] == round_:
            await link.send(self._last_activations[1])
            return

        def forward() -> tuple[Any, float | None, Any, float]:  # one thread hop, padding included
            acts, labels, seconds = trainer.forward(round_, batch_size)
            x, x_scale = pack(acts, trainer.compression)  # as the job's codec says
            return x, x_scale, labels, pad_compute(seconds, self.cfg.emulation)

        try:
            x, x_scale, labels, seconds = await asyncio.to_thread(forward)
        except CompressionError as exc:  # a diverged partition: NaN, or beyond float16
            raise JobFailed(f"the activations of round {round_}: {exc}") from exc
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
        await link.send(frame)
