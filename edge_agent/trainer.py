"""The client partition's training step on a device: forward to the cut, backward from it.

The orchestrator sends the job (model, cut, shard, hyper-parameters, identical initial weights);
each round this trainer samples a batch from its shard, runs the client partition forward, hands
back the cut-layer activations, and later applies the activation gradient the server returns.
Everything here is synchronous torch code; the connection runs it off the event loop.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from models import build_split, select_device

from .align import alignment_penalty, blend, cosine, track
from .anchor import LeaderTrajectory
from .errors import CheckpointError
from .jobspec import JobSpec
from .schedule import round_lr
from .weights import (
    copy_numpy_state,
    flat_grad,
    flatten,
    load_numpy_state,
    set_flat_grad,
    state_to_numpy,
    unflatten,
)

# A benchmark times at least this much work, so that a fast device's figure is not one timer
# tick; and at most this many repeats, so that a batch too small to time ends anyway.
BENCH_MIN_S = 0.2
BENCH_MAX_REPEATS = 5000


class BatchSampler:
    """Deterministic mini-batches from a shard: reshuffled each epoch, seeded by (seed, rank).

    The in-process reference engine draws the same batches, so it can match a distributed run.
    """

    def __init__(self, shard: np.ndarray, seed: int, rank: int) -> None:
        if len(shard) == 0:
            raise ValueError("empty shard")
        self._shard = np.asarray(shard, dtype=np.int64)
        self.shard = self._shard
        self._rng = np.random.default_rng([seed, rank])
        self._order = self._rng.permutation(self._shard)
        self._pos = 0

    def next(self, batch_size: int) -> np.ndarray:
        out = []
        need = batch_size
        while need > 0:
            if self._pos == len(self._order):
                self._order = self._rng.permutation(self._shard)
                self._pos = 0
            take = self._order[self._pos : self._pos + need]
            self._pos += len(take)
            need -= len(take)
            out.append(take)
        return np.concatenate(out)

    def state(self) -> dict[str, Any]:
        """Where the sampler stands, in plain types and tensors (for a checkpoint)."""
        return {
            "rng": self._rng.bit_generator.state,
            "order": torch.from_numpy(self._order.copy()),
            "pos": self._pos,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self._rng.bit_generator.state = dict(state["rng"])
        self._order = np.asarray(state["order"].numpy(), dtype=np.int64)
        self._pos = int(state["pos"])


class ClientTrainer:
    """One device's client partition, its optimizer and its batch sampler."""

    def __init__(
        self,
        job: JobSpec | Mapping[str, Any],
        shard: np.ndarray,
        weights: Mapping[str, np.ndarray],
        x_train: np.ndarray,
        y_train: np.ndarray,
        normalize: Any,
        device: str = "auto",
    ) -> None:
        # A map written by hand (tests, tools) may leave out what has a default; a received job
        # was checked whole by JobSpec.from_wire.
        job = job if isinstance(job, JobSpec) else JobSpec.from_partial(job)
        self.job = job
        self.device = select_device(device)
        # The weights come from the job, so building the model needs no seeding here.
        split = build_split(job.model, job.cut, num_classes=job.num_classes)
        self.model = split.client
        load_numpy_state(self.model, weights)
        self.model.to(self.device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=job.lr,
            momentum=job.momentum,
            weight_decay=job.weight_decay,
        )
        self._x, self._y, self._normalize = x_train, y_train, normalize
        self.sampler = BatchSampler(shard, job.seed, job.rank)
        self.shard_size = len(shard)
        self._pending: tuple[int, torch.Tensor] | None = None
        self._held: int | None = None
        self._graph_grads: tuple[torch.Tensor, ...] | None = None
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._anchor = job.client_anchor
        self._initial = [p.detach().clone() for p in self._params] if self._anchor > 0 else []
        self.gda_mode = job.gda_mode
        # GAPSL's client space compares either raw gradients or the momentum steps built from them
        self.leader_kind = job.gapsl_leader
        self._own: list[torch.Tensor] = []
        # tracking GDA: the device's reference for its own client gradient (None until the first)
        self._track_ref: torch.Tensor | None = None
        self._track_beta = job.track_beta
        # the leader-trajectory anchor's common reference theta_bar (edge_agent.anchor)
        self._trajectory = (
            LeaderTrajectory(self._params, job.lr, job.momentum, job.weight_decay)
            if job.gda_mode == "anchor"
            else None
        )
        self._lr = job.lr
        self._decay = job.lr_decay
        self._rounds = job.rounds  # only a schedule needs it
        # How activations and gradients travel (edge_agent.compress); the connection packs them.
        self.compression = job.compression
        self.applied_round = 0
        # (round, cos(g', g_L)) of the last alignment, g' what it stepped by (see align)
        self.aligned: tuple[int, float] | None = None

    def forward(self, round_: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Sample a batch and run the client partition; returns (activations, labels, seconds)."""
        start = time.perf_counter()
        idx = self.sampler.next(batch_size)
        x = torch.from_numpy(self._normalize(self._x[idx])).to(self.device)
        self.model.train()
        acts = self.model(x)
        self._pending = (round_, acts)
        out = acts.detach().to("cpu", torch.float32).numpy()
        return out, self._y[idx].astype(np.int64), time.perf_counter() - start

    def backward(
        self, round_: int, grad: np.ndarray, hold: bool = False
    ) -> tuple[np.ndarray | None, float]:
        """Back-propagate the server's activation gradient for ``round_``.

        Without ``hold`` the optimizer steps at once (PSL). With ``hold`` (GAPSL in the client
        space) the step waits for :meth:`align`, and the client gradient is returned for upload.
        Returns (client gradient or None, seconds spent).
        """
        if self._pending is None or self._pending[0] != round_:
            raise ValueError(f"gradient for round {round_} but no forward pass of that round")
        start = time.perf_counter()
        acts = self._pending[1]
        g = torch.from_numpy(np.array(grad)).to(self.device, acts.dtype)
        if g.shape != acts.shape:
            raise ValueError(
                f"gradient shape {tuple(g.shape)} != activation shape {tuple(acts.shape)}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        # The exact alignment differentiates the client gradient itself, so it needs that
        # gradient with a graph; .grad comes from the plain backward, which keeps lam = 0
        # identical to PSL bit for bit (a create_graph backward rounds differently).
        exact = hold and self.gda_mode == "exact"
        if exact:
            self._graph_grads = torch.autograd.grad(
                acts, self._params, g, create_graph=True, retain_graph=True
            )
        acts.backward(g, retain_graph=exact)
        self._pending = None
        if not hold:
            self._step(round_)
            self.applied_round = round_
            return None, time.perf_counter() - start
        self._held = round_
        if self.leader_kind == "update":
            self._own = self._update_direction(round_)
            flat = flatten(self._own).to("cpu", torch.float32).numpy()
        else:
            flat = flat_grad(self._params).detach().to("cpu", torch.float32).numpy()
        return flat, time.perf_counter() - start

    def align(self, round_: int, leader: np.ndarray, mode: str, lam: float) -> float:
        """Turn the held client gradient toward the leader (GDA), then step; keep in
        :attr:`aligned` cos(g', g_L), g' the mode's aligned gradient (or update) it steps by."""
        if self._held != round_:
            raise ValueError(f"alignment for round {round_} but no held gradient of that round")
        start = time.perf_counter()
        g_l = torch.from_numpy(np.array(leader)).to(self.device)
        if mode == "exact":
            # PSL backward already filled .grad (with a graph); add lam * d(1 - cos)/d(theta).
            if self._graph_grads is None:
                raise ValueError("exact alignment needs a backward with hold in exact mode")
            flat = flatten(self._graph_grads)
            penalty = alignment_penalty(flat, g_l)
            extra = torch.autograd.grad(penalty, self._params, allow_unused=True)
            self._graph_grads = None
            with torch.no_grad():
                for p, e in zip(self._params, extra):
                    g = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                    p.grad = g + lam * e if e is not None else g
        elif self.leader_kind == "update":
            update = blend(mode, flatten(self._own), g_l, lam)
            self._keep_aligned(round_, update, g_l)
            self._apply_update(update)
            self._held = None
            self.applied_round = round_
            return time.perf_counter() - start
        elif mode == "tracking":
            self._track(g_l, lam)
        elif mode == "anchor" and self._trajectory is not None:
            self._trajectory.pull(self._params, lam)
        else:
            with torch.no_grad():
                set_flat_grad(self._params, blend(mode, flat_grad(self._params), g_l, lam))
        self._keep_aligned(round_, flat_grad(self._params), g_l)
        self._step(round_)
        if mode == "anchor" and self._trajectory is not None:
            self._trajectory.replay(g_l, self.optimizer.param_groups[0]["lr"])
        self._held = None
        self.applied_round = round_
        return time.perf_counter() - start

    @torch.no_grad()
    def _keep_aligned(self, round_: int, aligned: torch.Tensor, leader: torch.Tensor) -> None:
        c = float(cosine(aligned.detach().to(leader.dtype), leader))
        self.aligned = (round_, min(1.0, max(-1.0, c))) if np.isfinite(c) else None

    def aligned_report(self) -> dict[str, Any] | None:
        """The next ``client_grad`` upload's ``aligned`` field."""
        return None if self.aligned is None else dict(zip(("round", "cos"), self.aligned))

    @torch.no_grad()
    def _track(self, leader: torch.Tensor, lam: float) -> None:
        """Step direction g + lam * (g_L - r); then r follows g (an EMA of coefficient beta, so
        beta = 0 keeps this round's gradient for the next: gradient tracking). The first round
        has no reference yet and takes g itself, so its direction is the pull toward g_L."""
        g = flat_grad(self._params)
        ref = g if self._track_ref is None else self._track_ref
        set_flat_grad(self._params, track(g, leader, ref, lam))
        b = self._track_beta
        self._track_ref = g.clone() if b == 0 else b * ref + (1.0 - b) * g

    def _prepare(self, round_: int) -> None:
        """What comes before every step: the anchor's pull on .grad and the round's rate."""
        if self._anchor > 0:  # an L2 pull towards the shared initial weights
            with torch.no_grad():
                for p, p0 in zip(self._params, self._initial):
                    if p.grad is not None:
                        p.grad.add_(p - p0, alpha=self._anchor)
        if self._decay != "none":
            for group in self.optimizer.param_groups:
                group["lr"] = round_lr(self._lr, self._decay, round_, self._rounds)

    def _step(self, round_: int) -> None:
        self._prepare(round_)
        self.optimizer.step()

    @torch.no_grad()
    def _update_direction(self, round_: int) -> list[torch.Tensor]:
        """The step SGD would take this round (per unit of lr), computed as SGD computes it —
        weight decay into the gradient, then momentum — without changing any state."""
        self._prepare(round_)
        group = self.optimizer.param_groups[0]
        mu, wd = float(group["momentum"]), float(group["weight_decay"])
        out = []
        for p in self._params:
            d = p.grad if p.grad is not None else torch.zeros_like(p)
            if wd != 0:
                d = d.add(p, alpha=wd)
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if mu == 0 or buf is None:
                out.append(d.clone())
            else:
                out.append(buf.mul(mu).add(d))
        return out

    @torch.no_grad()
    def _apply_update(self, step: torch.Tensor) -> None:
        """Step by the aligned update; the momentum buffers keep the device's own update."""
        group = self.optimizer.param_groups[0]
        for p, own, part in zip(self._params, self._own, unflatten(step, self._params)):
            if float(group["momentum"]) != 0:
                self.optimizer.state[p]["momentum_buffer"] = own
            p.add_(part.to(p.dtype), alpha=-float(group["lr"]))
        self._own = []

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the client partition's weights (SFL averaging); the optimizer state stays."""
        copy_numpy_state(self.model, weights)

    def benchmark(
        self, batch_size: int, repeats: int, min_s: float = BENCH_MIN_S
    ) -> tuple[float, float]:
        """Forward and backward seconds of one round's work on ``batch_size`` samples.

        Each repeat does what a round does: gather and normalise the batch, run the client
        partition, copy the activations out (forward); back-propagate a gradient and step the
        optimizer (backward). It runs on a copy of the partition and its optimizer, so the
        model, its optimizer state and the sampler are untouched. Repeats until at least
        ``min_s`` of work is timed and reports the fastest repeat of each: the device's own
        cost, robust to the preemption a busy machine adds to some repeats. The orchestrator
        asks for two batch sizes and reads a fixed cost per step and a cost per sample from them.
        """
        idx = np.resize(self.sampler.shard, batch_size)  # a fixed batch: the sampler is untouched
        model = copy.deepcopy(self.model)
        group = self.optimizer.param_groups[0]
        opt = torch.optim.SGD(
            model.parameters(),
            lr=float(group["lr"]),
            momentum=float(group["momentum"]),
            weight_decay=float(group["weight_decay"]),
        )
        fwd: list[float] = []
        bwd: list[float] = []
        model.train()
        while len(fwd) < max(repeats, 1) or (
            sum(fwd) + sum(bwd) < min_s and len(fwd) < BENCH_MAX_REPEATS
        ):
            t0 = time.perf_counter()
            x = torch.from_numpy(self._normalize(self._x[idx])).to(self.device)
            acts = model(x)
            acts.detach().to("cpu", torch.float32).numpy()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            acts.backward(torch.ones_like(acts))
            opt.step()
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        return min(fwd), min(bwd)

    def has_forward(self, round_: int) -> bool:
        """Whether a forward pass of ``round_`` is waiting for its gradient."""
        return self._pending is not None and self._pending[0] == round_

    def skip(self, round_: int) -> None:
        """The orchestrator left this device out of ``round_``: drop that forward pass."""
        if self._pending is not None and self._pending[0] == round_:
            self._pending = None

    def weights(self) -> dict[str, np.ndarray]:
        return state_to_numpy(self.model)

    def checkpoint(self) -> dict[str, Any]:
        """Everything a restarted device needs to carry on: partition, optimizer, sampler."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state(),
            "applied_round": self.applied_round,
            "track_ref": None if self._track_ref is None else self._track_ref.detach().cpu(),
            "anchor": None if self._trajectory is None else self._trajectory.state_dict(),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load a :meth:`checkpoint`; strict, so another model's checkpoint is a CheckpointError."""
        try:
            self.model.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.restore(state["sampler"])
            self.applied_round = int(state["applied_round"])
            ref = state.get("track_ref")  # absent from checkpoints of before tracking GDA
            self._track_ref = None if ref is None else ref.to(self.device)
            anchor = state.get("anchor")  # absent from checkpoints of before the anchor
            if self._trajectory is not None and anchor is not None:
                self._trajectory.load_state_dict(anchor)
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{type(exc).__name__}: {exc}") from exc
        self._pending = None
        self._held = None
        self._graph_grads = None
