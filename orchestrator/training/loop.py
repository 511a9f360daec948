"""The round loop shared by the distributed engine and the in-process reference engine.

The loop talks to its devices only through a :class:`~orchestrator.training.devices.DeviceGroup`
and to its training rule only through the :class:`~orchestrator.algorithms.base.Rule` hooks; the
scheduler plans each round, the recorder writes what it left behind. Everything here is one piece
of code for both engines, which is why they produce the same metrics for the same manifest and
seed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.compress import wire_dtype
from edge_agent.schedule import round_lr
from orchestrator.algorithms.base import ServerPart, ServerStepResult
from orchestrator.algorithms.dispatch import rule_for
from orchestrator.config.manifest import Manifest
from orchestrator.errors import RunError, RunInterrupted
from orchestrator.names import Phase
from orchestrator.records import checkpoint
from orchestrator.training.devices import ClientGrad, DeviceGroup, Weights
from orchestrator.training.evaluation import client_spread, evaluate_many
from orchestrator.training.guard import StabilityGuard
from orchestrator.training.recorder import Recorder
from orchestrator.training.replay import Replay
from orchestrator.training.scheduler import Planner
from orchestrator.training.state import RunState
from orchestrator.training.transfer import to_device, to_host

STOP_FETCH_MIN_S = 10.0  # a stopping run waits this long at least for the devices' weights
FETCH_MIN_S = 5.0  # with a deadline policy, the least a weight collection waits
FETCH_ROUNDS = 10  # recent rounds whose slowest sets the weight collection's deadline


def align_after_prev(r: int, uploads: Iterable[ClientGrad]) -> float | None:
    """Mean cos(g', g_L) of round ``r - 1`` over the devices whose round-``r`` upload reported
    it; None when none did (the first round, old agents, or no one aligned in ``r - 1``)."""
    cos = [u.aligned[1] for u in uploads if u.aligned is not None and u.aligned[0] == r - 1]
    return float(np.mean(cos)) if cos else None


class Runner:
    """Runs the rounds of one manifest against a device group, updating state and records."""

    def __init__(self, m: Manifest, job: Any, group: DeviceGroup, state: RunState) -> None:
        self.m, self.job, self.group, self.state = m, job, group, state
        self.records = state.records
        self.optimizer = job.optimizer
        self.server_part = ServerPart(job.server, job.optimizer)
        self.rule = rule_for(m)
        self.shard_sizes = {i: len(job.shards[k]) for k, i in enumerate(group.ids)}
        self.wire_ratio = wire_dtype(m.training.compression).itemsize / 4.0  # vs float32
        # in the client space the client gradient goes up and the leader down, in float32
        sync = 0.0
        if self.rule.holds_client_grads:
            sync = 4.0 * sum(p.numel() for p in job.client_template.parameters())
        self.planner = Planner(m, self.rule.pooled, self.wire_ratio, sync)
        sc = m.scheduler  # only latency_balanced plans devices below training.batch_size
        top_up = sc.top_up == "replay" and sc.policy == "latency_balanced" and not self.rule.pooled
        self.replay = Replay(m.training.batch_size) if top_up else None
        self.recorder = Recorder(state)
        self.guard = StabilityGuard(job.dataset.num_classes)
        self.rule.setup(job, group.ids)
        self.checkpoint_dir: Path | None = None  # where checkpoint.pt goes; None = none
        self.run_id = ""
        self.start_round = 1
        self.client_weights: dict[str, Weights] = {}  # as last collected, for the checkpoint
        self.checkpointed_round = 0

    async def profile(self) -> None:
        """Measure every device (link and compute) before the first round, where the group can."""
        probe = getattr(self.group, "profile", None)
        if probe is None:
            return
        b = self.m.training.batch_size
        # the link carries the cut tensors in the wire codec (training.compression)
        act_bytes = float(self.job.act_bytes_per_sample) * self.wire_ratio
        self.planner.act_bytes_per_sample = act_bytes
        self.planner.profiles = await probe(int(act_bytes * b), b)
        self.recorder.profiled(self.planner.profiles)

    async def train(self) -> None:
        t = self.m.training
        self.state.phase = Phase.TRAINING
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

    # --- one round ----------------------------------------------------------------------------

    def _server_step(
        self, acts: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> ServerStepResult:
        return self.rule.server_step(self.server_part, acts, labels)

    async def round(self, r: int) -> None:
        m, st, job, rule = self.m, self.state, self.job, self.rule
        start = time.perf_counter()
        planned, batch, predicted = self.planner.plan(r, list(self.group.ids))
        self.recorder.round_started(r, batch)
        deadline = self.planner.deadline_s(r, predicted)
        fwd = await self.group.forward(r, batch, deadline, m.scheduler.min_participants)
        ids = [i for i in planned if i in fwd]
        for i in planned:
            if i not in fwd:
                st.event("straggler", i, {"round": r, "deadline_s": round(deadline or 0.0, 3)})
        dev = job.server_device
        await asyncio.sleep(0)  # as below: the loop reads its sockets between per-device passes
        acts = to_device([fwd[i].acts for i in ids], dev)  # pinned + non-blocking on CUDA
        labels = to_device([fwd[i].labels for i in ids], dev)
        # devices whose batch the server topped up: their own rows (their recorded loss is the
        # server's on the whole topped-up batch, what it learnt from)
        fresh: dict[str, int] = {}
        if self.replay is not None:
            acts, labels, fresh = self.replay.top_up(ids, acts, labels)
        rule.begin_round(r, ids)
        t_server = time.perf_counter()
        if m.training.lr_decay != "none":
            lr = round_lr(m.training.lr, m.training.lr_decay, r, m.training.rounds)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        result = await asyncio.to_thread(self._server_step, acts, labels)
        server_s = time.perf_counter() - t_server
        sent = list(result.grads)
        for k, i in enumerate(ids):  # of a topped-up batch, the gradient of its fresh rows' loss
            if i in fresh:
                sent[k] = sent[k][: fresh[i]] * (len(labels[k]) / fresh[i])
        grads = dict(zip(ids, to_host(sent)))
        losses = dict(zip(ids, result.losses))
        norms = {i: float(np.linalg.norm(grads[i])) for i in ids}
        for dev, fields in self.guard.check(r, losses, norms):
            st.event("unstable", dev, fields)
        for i, scale in self.planner.step_scales({i: len(fwd[i].labels) for i in ids}).items():
            grads[i] = grads[i] * np.float32(scale)
        t_down = time.perf_counter()
        hold = rule.holds_client_grads
        client_grads = await self.group.backward(r, grads, losses, hold)
        diag = dict(result.diag)
        align_s = 0.0
        if hold:
            # a device that went away after its forward pass is aligned without
            held = [i for i in ids if i in client_grads]
            t_align = time.perf_counter()
            g_list = [torch.from_numpy(np.array(client_grads[i].grad)) for i in held]
            aligned = rule.align(g_list, [len(fwd[i].labels) for i in held])
            align_s = time.perf_counter() - t_align
            diag.update(aligned.diag)
            diag["align_after_prev"] = align_after_prev(r, client_grads.values())
            await self.group.align(r, held, aligned.leader, aligned.mode, aligned.lam)
        downlink_s = time.perf_counter() - t_down
        if rule.averages(r):
            await self._average(r)
        # Each pass below visits every device: with a thousand of them, keepalives and
        # telemetry are read in between rather than after all of them (bench.scale).
        await asyncio.sleep(0)
        self.planner.observe(r, {i: fwd[i] for i in ids}, server_s, align_s)
        await asyncio.sleep(0)
        self.recorder.round(
            r, ids, time.perf_counter() - start, fwd, losses, result.loss, server_s, downlink_s,
            diag, predicted,
        )  # fmt: skip

    def _fetch_deadline(self) -> float | None:
        """With a deadline policy, a stalled device must not stall weight collection either."""
        if self.m.scheduler.deadline_factor <= 0 or not self.state.round_times:
            return None
        recent = list(self.state.round_times)[-FETCH_ROUNDS:]
        return max(FETCH_MIN_S, self.m.scheduler.deadline_factor * 4 * max(recent))

    async def _average(self, r: int) -> None:
        states = await self.group.fetch_weights(r, self._fetch_deadline())
        ids = [i for i in self.group.ids if i in states]
        avg = self.rule.average([states[i] for i in ids], [self.shard_sizes[i] for i in ids])
        await self.group.set_weights(r, avg)

    # --- evaluation ---------------------------------------------------------------------------

    async def evaluate(self, r: int) -> None:
        st = self.state
        st.phase = Phase.EVALUATING
        keep = self.checkpoint_dir is not None
        states = await self.group.fetch_weights(r, self._fetch_deadline(), checkpoint=keep)
        ids = [i for i in self.group.ids if i in states]
        for i in self.group.ids:
            if i not in states:
                st.event("straggler", i, {"round": r, "during": "evaluation"})
        scores, spread = await asyncio.to_thread(self._score, [states[i] for i in ids])
        # The record before the checkpoint: killed in between, a resumed run starts from the
        # previous checkpoint and records this evaluation again (marked a repeat). The other way
        # round it would start after this round, and its evaluation would be missing for good.
        self.recorder.evaluation(r, ids, scores, spread)
        if keep:
            self.client_weights.update(states)
            await asyncio.to_thread(self._save_checkpoint, r)
        if self.planner.profiles:
            self.recorder.refined(self.planner.profiles)
        st.phase = Phase.TRAINING

    def _score(self, states: list[Weights]) -> tuple[list[tuple[float, float]], float | None]:
        """Accuracy and loss of every device's model, and the spread of the partitions."""
        job = self.job
        try:
            out = evaluate_many(job.client_template, job.server, states, job.x_test, job.y_test)
        except (RuntimeError, KeyError) as exc:
            raise RunError(f"a device returned weights that do not fit the model: {exc}") from exc
        return out, client_spread(states)

    # --- checkpoints --------------------------------------------------------------------------

    async def _interrupt(self, r: int) -> None:
        """Stop after round ``r``: checkpoint it (devices too), then end the run as interrupted."""
        if self.checkpoint_dir is not None and r > self.checkpointed_round and r >= 1:
            self.state.phase = Phase.CHECKPOINTING
            deadline = max(STOP_FETCH_MIN_S, self._fetch_deadline() or 0.0)
            states = await self.group.fetch_weights(r, deadline, checkpoint=True)
            self.client_weights.update(states)
            await asyncio.to_thread(self._save_checkpoint, r)
        raise RunInterrupted(f"interrupted after round {r}")

    def _save_checkpoint(self, r: int) -> None:
        assert self.checkpoint_dir is not None
        missing = [i for i in self.group.ids if i not in self.client_weights]
        if missing:  # a device that never answered has nothing to resume from yet
            self.state.event("checkpoint_skipped", None, {"round": r, "missing": ",".join(missing)})
            return
        checkpoint.save(self.checkpoint_dir, self.state_dict(r))
        self.checkpointed_round = r
        self.state.event("checkpoint", None, {"round": r})

    def state_dict(self, r: int) -> dict[str, Any]:
        """What the loop needs to carry on after round ``r``, as tensors and plain values."""
        return {
            "round": r,
            "run_id": self.run_id,
            "server": {k: v.detach().cpu() for k, v in self.job.server.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "clients": {
                i: checkpoint.weights_to_tensors(w) for i, w in self.client_weights.items()
            },
            "rule": self.rule.state_dict(),
            "guard": self.guard.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **self.planner.state_dict(),
            **self.recorder.state_dict(),
            **({"replay": self.replay.state_dict()} if self.replay is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the next round is the one after it."""
        self.job.server.load_state_dict(state["server"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        # checkpoints written before rules kept their own state held the leader's EMA on top
        rule_state = state.get("rule", {"leader_ema": state.get("leader_ema")})
        self.rule.load_state_dict(rule_state, self.job.server_device)
        self.planner.load_state_dict(state)
        self.recorder.load_state_dict(state)
        if self.replay is not None and "replay" in state:
            self.replay.load_state_dict(state["replay"], self.job.server_device)
        if "guard" in state:  # checkpoints of before the guard start it afresh
            self.guard.load_state_dict(state["guard"])
        torch.set_rng_state(state["torch_rng"])
        self.client_weights = {
            i: checkpoint.tensors_to_weights(w) for i, w in state["clients"].items()
        }
        self.start_round = int(state["round"]) + 1
        self.checkpointed_round = int(state["round"])
