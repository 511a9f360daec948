"""The training loop shared by the distributed engine and the in-process reference engine.

The loop talks to its devices only through a :class:`DeviceGroup`: over WebSockets in a real run,
by direct calls in ``simulate``. Everything else — batches, the server rule of each algorithm,
LGI state, SFL averaging, evaluation, records — is this one piece of code, which is why the two
engines produce the same metrics for the same manifest and seed.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from edge_agent.compress import wire_dtype
from edge_agent.trainer import load_numpy_state, round_lr
from orchestrator.algorithms import base as algorithms
from orchestrator.algorithms.base import client_spread
from orchestrator.algorithms.gapsl import LeaderTracker, client_alignment, gapsl_server_step
from orchestrator.config.manifest import Manifest
from orchestrator.records import checkpoint
from orchestrator.training.latency import (
    DeviceProfile,
    Prediction,
    balance_batches,
    predict_round,
    sample_participants,
)
from orchestrator.training.state import RunState
from orchestrator.training.transfer import to_device, to_host
from orchestrator.ui.snapshot import EvalPoint, GapslView, RoundPoint

Weights = dict[str, np.ndarray]


@dataclass
class ForwardOut:
    acts: np.ndarray
    labels: np.ndarray
    compute_s: float  # as the device measured it
    wait_s: float  # from request to reply, as the orchestrator saw it
    backward_s: float | None = None  # the device's previous backward, for the profiler
    nbytes: int = 0  # activation and label bytes uploaded


class DeviceGroup(Protocol):
    """The devices of a run, however they are reached. Results are keyed by device id."""

    ids: list[str]

    async def forward(
        self,
        r: int,
        batch: dict[str, int],
        deadline_s: float | None = None,
        min_participants: int = 1,
    ) -> dict[str, ForwardOut]: ...

    async def backward(
        self, r: int, grads: dict[str, np.ndarray], losses: dict[str, float], hold: bool
    ) -> dict[str, np.ndarray]: ...

    async def align(
        self, r: int, ids: list[str], leader: np.ndarray, mode: str, lam: float
    ) -> None: ...

    async def fetch_weights(
        self, r: int, deadline_s: float | None = None, checkpoint: bool = False
    ) -> dict[str, Weights]: ...

    async def set_weights(self, r: int, weights: Weights) -> None: ...


def uses_client_space(m: Manifest) -> bool:
    return m.training.algorithm == "gapsl" and m.gapsl.space == "client"


class Runner:
    """Runs the rounds of one manifest against a device group, updating state and records."""

    def __init__(self, m: Manifest, job: Any, group: DeviceGroup, state: RunState) -> None:
        self.m, self.job, self.group, self.state = m, job, group, state
        self.records = state.records
        t = m.training
        self.optimizer = job.optimizer
        g = m.gapsl
        self.tracker = LeaderTracker(tau=g.tau, rho=g.rho, beta=g.ema_beta)
        self.shard_sizes = {i: len(job.shards[k]) for k, i in enumerate(group.ids)}
        self.profiles: dict[str, DeviceProfile] = {}  # filled by profile(); empty in simulate
        self.act_bytes_per_sample = 0.0
        self.server_s_per_sample = 0.0
        self._participation_rng = np.random.default_rng([t.seed, 0x5C4ED])
        self._last_leaders: set[str] | None = None
        self._churn: collections.deque[float] = collections.deque(maxlen=20)
        self._wire_ratio = wire_dtype(t.compression).itemsize / 4.0  # vs float32
        self.checkpoint_dir: Path | None = None  # where checkpoint.pt goes; None = none
        self.run_id = ""
        self.start_round = 1
        self._client_weights: dict[str, Weights] = {}  # as last collected, for the checkpoint
        self.checkpointed_round = 0

    async def profile(self) -> None:
        """Measure every device (link and compute) before the first round, where the group can."""
        probe = getattr(self.group, "profile", None)
        if probe is None:
            return
        b = self.m.training.batch_size
        # the link carries the cut tensors in the wire codec (training.compression)
        self.act_bytes_per_sample = float(self.job.act_bytes_per_sample) * self._wire_ratio
        self.profiles = await probe(int(self.act_bytes_per_sample * b), b)
        for i, p in self.profiles.items():
            self.records.append(
                "devices",
                {
                    "t": round(self.records.elapsed(), 3),
                    "device": i,
                    "source": "probe",
                    **p.record(),
                },
            )
            self.state.event(
                "profiled",
                i,
                {
                    k: v
                    for k, v in p.record().items()
                    if k in ("rtt_ms", "uplink_mbps", "downlink_mbps", "compute_ms_per_sample")
                },
            )
        self.state.profiles = self.profiles

    async def train(self) -> None:
        t = self.m.training
        self.state.phase = "training"
        self.state.round_started = self.records.elapsed()
        await self.profile()
        for r in range(self.start_round, t.rounds + 1):
            if self.state.stop_requested:
                await self._interrupt(r - 1)
            self.state.round = r
            await self.round(r)
            if r % t.eval_every == 0 or r == t.rounds:
                await self.evaluate(r)
        if self.state.stop_requested and self.checkpointed_round < t.rounds:
            await self._interrupt(t.rounds)

    # --- checkpoints --------------------------------------------------------------------------

    async def _interrupt(self, r: int) -> None:
        """Stop after round ``r``: checkpoint it (devices too), then end the run as interrupted."""
        from orchestrator.errors import RunInterrupted

        if self.checkpoint_dir is not None and r > self.checkpointed_round and r >= 1:
            self.state.phase = "checkpointing"
            states = await self.group.fetch_weights(r, self._stop_deadline(), checkpoint=True)
            self._client_weights.update(states)
            await asyncio.to_thread(self._save_checkpoint, r)
        raise RunInterrupted(f"interrupted after round {r}")

    def _stop_deadline(self) -> float:
        return max(10.0, self._fetch_deadline() or 0.0)

    def _save_checkpoint(self, r: int) -> None:
        assert self.checkpoint_dir is not None
        missing = [i for i in self.group.ids if i not in self._client_weights]
        if missing:  # a device that never answered has nothing to resume from yet
            self.state.event("checkpoint_skipped", None, {"round": r, "missing": ",".join(missing)})
            return
        checkpoint.save(self.checkpoint_dir, checkpoint.runner_state(self, r))
        self.checkpointed_round = r
        self.state.event("checkpoint", None, {"round": r})

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the next round is the one after it."""
        checkpoint.restore_runner(self, state)
        self.start_round = int(state["round"]) + 1
        self.checkpointed_round = int(state["round"])

    def _server_step(
        self, acts: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> algorithms.ServerStepResult:
        m, server = self.m, self.job.server
        algo = m.training.algorithm
        if algo == "epsl":
            return algorithms.epsl_server_step(server, self.optimizer, acts, labels, m.epsl.phi)
        if algo == "gapsl" and m.gapsl.space != "client":
            g = m.gapsl
            return gapsl_server_step(
                server,
                self.optimizer,
                acts,
                labels,
                self.tracker,
                g.space,
                g.gda_mode,
                g.gda_lambda,
            )
        return algorithms.psl_server_step(server, self.optimizer, acts, labels)

    def _plan(self, r: int) -> tuple[list[str], dict[str, int], Prediction | None]:
        """Who takes part in round r, with which batch sizes, and the predicted round time."""
        m, sc = self.m, self.m.scheduler
        ids = list(self.group.ids)
        if sc.participation < 1.0:
            ids = sample_participants(
                ids, sc.participation, sc.min_participants, self._participation_rng
            )
        b = m.training.batch_size
        if (
            m.training.algorithm == "central"
        ):  # the pooled-data ceiling takes everyone's batch at once
            return ids, {i: b * len(m.devices) for i in ids}, None
        batch = {i: b for i in ids}
        if sc.policy == "latency_balanced" and self.profiles:
            # A floor of a quarter batch keeps a slow device's partition learning at all.
            batch = balance_batches(
                {i: self.profiles[i] for i in ids},
                b * len(ids),
                self.act_bytes_per_sample,
                max(1, b // 4),
            )
        predicted = None
        if self.profiles:
            predicted = predict_round(
                self.profiles,
                batch,
                self.act_bytes_per_sample,
                self.server_s_per_sample,
                after_first=r > 1,
            )
        return ids, batch, predicted

    async def round(self, r: int) -> None:
        m, st, job = self.m, self.state, self.job
        start = time.perf_counter()
        planned, batch, predicted = self._plan(r)
        for s in st.sessions:
            s.status = "computing" if s.id in batch else s.status
        deadline = None
        if predicted is not None and m.scheduler.deadline_factor > 0 and r > 1:
            deadline = m.scheduler.deadline_factor * predicted.total_s
        fwd = await self.group.forward(r, batch, deadline, m.scheduler.min_participants)
        ids = [i for i in planned if i in fwd]
        for i in planned:
            if i not in fwd:
                st.event("straggler", i, {"round": r, "deadline_s": round(deadline or 0.0, 3)})
        for s in st.sessions:
            if s.id in fwd:
                s.status = "joined"
        dev = job.server_device
        acts = to_device([fwd[i].acts for i in ids], dev)  # pinned + non-blocking on CUDA
        labels = to_device([fwd[i].labels for i in ids], dev)
        t_server = time.perf_counter()
        if m.training.lr_decay != "none":
            lr = round_lr(m.training.lr, m.training.lr_decay, r, m.training.rounds)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        result = await asyncio.to_thread(self._server_step, acts, labels)
        server_s = time.perf_counter() - t_server
        hold = uses_client_space(m)
        grads = dict(zip(ids, to_host(result.grads)))
        losses = dict(zip(ids, result.losses))
        t_down = time.perf_counter()
        client_grads = await self.group.backward(r, grads, losses, hold)
        diag = dict(result.diag)
        if hold:
            # a device that went away after its forward pass is aligned without
            held = [i for i in ids if i in client_grads]
            g_list = [torch.from_numpy(np.array(client_grads[i])) for i in held]
            leader, diag = client_alignment(
                self.tracker, g_list, [len(fwd[i].labels) for i in held]
            )
            await self.group.align(r, held, leader.numpy(), m.gapsl.gda_mode, m.gapsl.gda_lambda)
        downlink_s = time.perf_counter() - t_down
        if m.training.algorithm == "sfl" and r % m.sfl.avg_every == 0:
            await self._fedavg(r)
        total = sum(len(fwd[i].labels) for i in ids)
        self.server_s_per_sample = (
            server_s / total
            if self.server_s_per_sample == 0
            else (0.7 * self.server_s_per_sample + 0.3 * server_s / total)
        )
        for i in ids:
            st.device_loss[i] = losses[i]
            st.device_rounds[i] = r
            st.device_batch[i] = len(fwd[i].labels)
            st.compute_ms[i] = 1000.0 * fwd[i].compute_s / max(len(fwd[i].labels), 1)
            p = self.profiles.get(i)
            if p is not None:
                p.update_compute(fwd[i].compute_s, fwd[i].backward_s, len(fwd[i].labels))
                path = fwd[i].wait_s - fwd[i].compute_s - (fwd[i].backward_s or 0.0)
                # from round 2 on, the previous gradient came down on the same path
                grad_bytes = int(fwd[i].acts.nbytes * self._wire_ratio) if r > 1 else 0
                p.update_uplink(fwd[i].nbytes, path, grad_bytes)
        self._record(
            r,
            ids,
            time.perf_counter() - start,
            fwd,
            result.loss,
            server_s,
            downlink_s,
            diag,
            predicted,
        )

    def _fetch_deadline(self) -> float | None:
        """With a deadline policy, a stalled device must not stall weight collection either."""
        if self.m.scheduler.deadline_factor <= 0 or not self.state.rounds:
            return None
        recent = [p.round_time_s for p in list(self.state.rounds)[-10:]]
        return max(5.0, self.m.scheduler.deadline_factor * 4 * max(recent))

    async def _fedavg(self, r: int) -> None:
        states = await self.group.fetch_weights(r, self._fetch_deadline())
        ids = [i for i in self.group.ids if i in states]
        avg = algorithms.fedavg(
            [{k: torch.from_numpy(np.array(v)) for k, v in states[i].items()} for i in ids],
            [self.shard_sizes[i] for i in ids],
        )
        await self.group.set_weights(r, {k: v.numpy() for k, v in avg.items()})

    def _record(
        self, r: int, ids: list[str], round_s: float, fwd: dict[str, ForwardOut], loss: float,
        server_s: float, downlink_s: float, diag: dict[str, Any], predicted: Prediction | None,
    ) -> None:  # fmt: skip
        per_device = {
            i: {
                "batch": int(len(f.labels)),
                "compute_s": round(f.compute_s, 6),
                "uplink_s": round(max(f.wait_s - f.compute_s, 0.0), 6),
                "wait_s": round(f.wait_s, 6),
            }
            for i, f in fwd.items()
        }
        leaders = diag.get("leaders")
        if leaders is not None:
            diag["leaders"] = [ids[k] for k in leaders]
        record = {
            "round": r,
            "round_time_s": round(round_s, 6),
            "predicted_s": round(predicted.total_s, 6) if predicted else None,
            "predicted": None
            if predicted is None
            else {
                "critical": predicted.critical,
                "compute_s": round(predicted.compute_s, 6),
                "uplink_s": round(predicted.uplink_s, 6),
                "server_s": round(predicted.server_s, 6),
                "downlink_s": round(predicted.downlink_s, 6),
            },
            "participants": ids,
            "server_s": round(server_s, 6),
            "downlink_s": round(downlink_s, 6),
            "loss": loss,
            "leaders": diag.pop("leaders", None),
            "mean_cos": diag.pop("mean_cos", None),
            "devices": per_device,
        }
        record.update(diag)
        self.records.append("rounds", record)
        slowest = max(per_device.values(), key=lambda d: d["wait_s"])
        self.state.rounds.append(
            RoundPoint(
                round=r, round_time_s=round_s, loss=loss, compute_s=slowest["compute_s"],
                uplink_s=slowest["uplink_s"], server_s=server_s, downlink_s=downlink_s,
                predicted_s=predicted.total_s if predicted else None,
            )
        )  # fmt: skip
        if record["leaders"] is not None and "cos" in record:
            current = set(record["leaders"])
            if self._last_leaders is not None:
                self._churn.append(len(current ^ self._last_leaders) / max(len(current), 1))
            self._last_leaders = current
            self.state.gapsl = GapslView(
                churn=float(np.mean(self._churn)) if self._churn else None,
                leaders=tuple(record["leaders"]),
                cosine=tuple(tuple(row) for row in record["cos"]),
                device_ids=tuple(ids),
                align_before=record.get("align_before"),
                align_after=record.get("align_after"),
            )

    async def evaluate(self, r: int) -> None:
        st = self.state
        st.phase = "evaluating"
        keep = self.checkpoint_dir is not None
        states = await self.group.fetch_weights(r, self._fetch_deadline(), checkpoint=keep)
        ids = [i for i in self.group.ids if i in states]
        for i in self.group.ids:
            if i not in states:
                st.event("straggler", i, {"round": r, "during": "evaluation"})
        scores, spread = await asyncio.to_thread(self._score, [states[i] for i in ids])
        if keep:
            self._client_weights.update(states)
            await asyncio.to_thread(self._save_checkpoint, r)
        accs = [a for a, _ in scores]
        for i, (acc, _) in zip(ids, scores):
            st.device_acc[i] = acc
        point = EvalPoint(
            round=r,
            time_s=self.records.elapsed(),
            acc_mean=float(np.mean(accs)),
            acc_min=float(np.min(accs)),
            acc_max=float(np.max(accs)),
            loss=float(np.mean([loss for _, loss in scores])),
        )
        record: dict[str, Any] = {
            k: getattr(point, k)
            for k in ("round", "time_s", "acc_mean", "acc_min", "acc_max", "loss")
        }
        record["acc"] = dict(zip(ids, accs))
        record["client_spread"] = spread
        self.records.append("metrics", record)
        st.add_eval(point)
        st.phase = "training"

    def _score(self, states: list[Weights]) -> tuple[list[tuple[float, float]], float | None]:
        """Accuracy and loss of every device's model, and the spread of the partitions."""
        from orchestrator.errors import RunError

        job = self.job
        out = []
        for w in states:
            try:
                load_numpy_state(job.client_template, w)
            except (RuntimeError, KeyError) as exc:
                raise RunError(
                    f"a device returned weights that do not fit the model: {exc}"
                ) from exc
            out.append(algorithms.evaluate(job.client_template, job.server, job.x_test, job.y_test))
        return out, client_spread(states)
