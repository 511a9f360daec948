"""GAPSL: PSL plus leader gradient identification (LGI) and gradient direction alignment (GDA).

Our reconstruction (only the paper's abstract is public; docs/algorithms.md states every rule):
per-device gradients ``g_i`` in one of three spaces are compared by cosine; devices whose mean
cosine to the others reaches ``tau`` form the leader set (topped up by score to ``ceil(rho*N)``);
the leader ``g_L`` is their batch-weighted mean, smoothed across rounds by an EMA ``beta``; GDA
then turns every ``g_i`` toward ``g_L`` (exact: penalty ``lam*(1 - cos)``, or a first-order/pull
blend). Every function here is tensor code without I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from edge_agent.align import alignment_penalty
from orchestrator.algorithms.base import (
    Alignment,
    DeviceRole,
    Rule,
    ServerPart,
    ServerStepResult,
    Tensors,
    psl_backward,
)
from orchestrator.algorithms.lgi import LeaderTracker, aligned, client_alignment, lgi_diag
from orchestrator.algorithms.prior import log_priors, prior_corrected_grads
from orchestrator.algorithms.psl import psl_server_step
from orchestrator.config.manifest import Manifest


def gapsl_server_step(
    server: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: Tensors,
    labels: Tensors,
    tracker: LeaderTracker,
    space: str,
    mode: str,
    lam: float,
) -> ServerStepResult:
    """One server update with LGI + GDA in the ``server`` or ``cut`` space.

    Built as "PSL backward + lam * (alignment backward)": the PSL gradients are computed exactly
    as :func:`psl_server_step` does, and alignment only adds to them, so lam = 0 is PSL bit for bit.
    """
    if space not in ("server", "cut"):
        raise ValueError(f"gapsl_server_step handles the server and cut spaces, not {space!r}")
    params = [p for p in server.parameters() if p.requires_grad]
    base = psl_backward(server, optimizer, activations, labels)
    act_grads, sizes = list(base.grads), [len(y) for y in labels]
    total = sum(sizes)

    # Per-device gradients in the chosen space, with a graph when the exact mode needs one.
    exact = mode == "exact"
    own_leaves, flats = [], []
    for a, y in zip(activations, labels):
        leaf = a.detach().requires_grad_(True)
        loss_i = F.cross_entropy(server(leaf), y)
        if space == "server":
            g = torch.autograd.grad(loss_i, params, create_graph=exact)
            flat = torch.cat([t.reshape(-1) for t in g])
        else:  # cut: the batch mean of the activation gradient
            (g_a,) = torch.autograd.grad(loss_i, leaf, create_graph=exact)
            flat = g_a.mean(dim=0).reshape(-1)
        own_leaves.append(leaf)
        flats.append(flat)
    res = tracker(torch.stack([f.detach() for f in flats]), sizes)
    weights = [b / total for b in sizes]
    after: float | None = None

    if exact:
        for i, (leaf, flat) in enumerate(zip(own_leaves, flats)):
            penalty = alignment_penalty(flat, res.leader)
            extra = torch.autograd.grad(penalty, [*params, leaf], allow_unused=True)
            with torch.no_grad():
                for p, e in zip(params, extra[:-1]):
                    if e is not None:
                        p.grad = p.grad + (lam * weights[i]) * e  # type: ignore[operator,misc]
                if extra[-1] is not None:
                    act_grads[i] = act_grads[i] + lam * extra[-1]
    else:
        with torch.no_grad():
            stacked = torch.stack([f.detach() for f in flats])
            blended, after = aligned(mode, stacked, res.leader, lam)
            delta = blended - stacked  # exactly zero when lam = 0
            if space == "server":
                shift = (torch.tensor(weights, dtype=delta.dtype)[:, None] * delta).sum(dim=0)
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad = p.grad + shift[offset : offset + n].view_as(p)  # type: ignore[operator,misc]
                    offset += n
            else:  # shift each device's activation gradient so its batch mean is the aligned one
                act_grads = [ag + d.view(ag.shape[1:]) for ag, d in zip(act_grads, delta)]
    optimizer.step()
    return ServerStepResult(
        grads=[g.detach() for g in act_grads],
        losses=base.losses,
        loss=base.loss,
        diag=lgi_diag(res, after),
    )


class Gapsl(Rule):
    """GAPSL in the ``[gapsl]`` space: the server and cut spaces align inside the server step;
    the client space has the devices upload their client gradients and sends the leader down."""

    name = "gapsl"

    def __init__(self, m: Manifest) -> None:
        super().__init__(m)
        g = self.cfg = m.gapsl
        self.tracker = LeaderTracker(tau=g.tau, rho=g.rho, beta=g.ema_beta)
        self.holds_client_grads = g.space == "client"
        self.priors: torch.Tensor | None = None  # log label priors per device (prior_tau > 0)
        self.rank: dict[str, int] = {}
        self.round_ids: list[str] = []

    def setup(self, job: Any, ids: Sequence[str]) -> None:
        if self.cfg.prior_tau > 0:
            y = job.dataset.y_train
            self.priors = log_priors([y[s] for s in job.shards], job.dataset.num_classes)
            self.rank = {i: k for k, i in enumerate(ids)}

    def begin_round(self, r: int, ids: Sequence[str]) -> None:
        self.round_ids = list(ids)

    def device_role(self) -> DeviceRole:
        g = self.cfg
        return DeviceRole(g.space, g.gda_mode, g.leader, g.track_beta)

    def server_step(self, part: ServerPart, acts: Tensors, labels: Tensors) -> ServerStepResult:
        if self.holds_client_grads:  # the client space aligns on the devices, after backward
            if self.priors is None:
                return psl_server_step(part.module, part.optimizer, acts, labels)
            # the server learns from the plain loss; the devices get the prior-corrected one
            result = psl_backward(part.module, part.optimizer, acts, labels)
            priors = self.priors[[self.rank[i] for i in self.round_ids]]
            tau = self.cfg.prior_tau
            result.grads = prior_corrected_grads(part.module, acts, labels, priors, tau)
            part.optimizer.step()
            result.diag["prior_tau"] = tau
            return result
        g = self.cfg
        return gapsl_server_step(
            part.module,
            part.optimizer,
            acts,
            labels,
            self.tracker,
            g.space,
            g.gda_mode,
            g.gda_lambda,
        )

    def align(self, client_grads: Sequence[torch.Tensor], sizes: Sequence[int]) -> Alignment:
        g = self.cfg
        leader, diag = client_alignment(self.tracker, client_grads, sizes, g.gda_mode, g.gda_lambda)
        return Alignment(leader.numpy(), self.cfg.gda_mode, self.cfg.gda_lambda, diag)

    def state_dict(self) -> dict[str, object]:
        ema = self.tracker.ema
        return {"leader_ema": None if ema is None else ema.detach().cpu()}

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        ema = state.get("leader_ema")
        self.tracker.ema = ema.to(device) if isinstance(ema, torch.Tensor) else None
