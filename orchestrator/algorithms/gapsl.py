"""GAPSL on the server: leader gradient identification (LGI) and gradient direction alignment (GDA).

Our reconstruction (only the paper's abstract is public; docs/algorithms.md states every rule):
per-device gradients ``g_i`` in one of three spaces are compared by cosine; devices whose mean
cosine to the others reaches ``tau`` form the leader set (topped up by score to ``ceil(rho*N)``);
the leader ``g_L`` is their batch-weighted mean, smoothed across rounds by an EMA ``beta``; GDA
then turns every ``g_i`` toward ``g_L`` (exact: penalty ``lam*(1 - cos)``, or a first-order/pull
blend). Every function here is tensor code without I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from edge_agent.align import alignment_penalty, blend, cosine
from orchestrator.algorithms.base import ServerStepResult, psl_backward


@dataclass
class LgiResult:
    cos: torch.Tensor  # N x N cosine matrix of the devices' gradients
    scores: torch.Tensor  # s_i = mean_{j != i} cos_ij
    leaders: list[int]  # indices of the leader set, ascending
    leader: torch.Tensor  # g_L after the EMA
    align_before: float  # mean_i cos(g_i, g_L)


@dataclass
class LeaderTracker:
    """LGI with its state across rounds (the EMA of the leader)."""

    tau: float = 0.0
    rho: float = 0.5
    beta: float = 0.9
    ema: torch.Tensor | None = field(default=None, repr=False)

    def __call__(self, grads: torch.Tensor, sizes: Sequence[int]) -> LgiResult:
        g = grads.detach()
        n = g.shape[0]
        unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = unit @ unit.T
        scores = (
            (cos.sum(dim=1) - cos.diagonal()) / (n - 1) if n > 1 else torch.ones(1, dtype=g.dtype)
        )
        chosen = [i for i in range(n) if float(scores[i]) >= self.tau]
        need = min(n, math.ceil(self.rho * n))
        if len(chosen) < need:
            ranked = sorted(range(n), key=lambda i: (-float(scores[i]), i))
            chosen = sorted(set(chosen) | set(ranked[:need]))
        w = torch.tensor([float(sizes[i]) for i in chosen], dtype=g.dtype, device=g.device)
        current = (w[:, None] * g[chosen]).sum(dim=0) / w.sum()
        if self.ema is None or self.beta == 0.0:
            leader = current
        else:
            leader = self.beta * self.ema + (1.0 - self.beta) * current
        self.ema = leader
        before = float(cosine(g, leader[None, :]).mean())
        return LgiResult(cos=cos, scores=scores, leaders=chosen, leader=leader, align_before=before)


def _diag(res: LgiResult, after: float | None) -> dict[str, object]:
    return {
        "leaders": res.leaders,
        "cos": [[round(float(v), 4) for v in row] for row in res.cos],
        "mean_cos": float(
            (res.cos.sum() - res.cos.diagonal().sum()) / max(res.cos.numel() - len(res.cos), 1)
        ),
        "align_before": res.align_before,
        "align_after": after,
    }


def gapsl_server_step(
    server: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
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
            aligned = blend(mode, stacked, res.leader[None, :], lam)
            after = float(cosine(aligned, res.leader[None, :]).mean())
            delta = aligned - stacked  # exactly zero when lam = 0
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
        diag=_diag(res, after),
    )


def client_alignment(
    tracker: LeaderTracker, client_grads: Sequence[torch.Tensor], sizes: Sequence[int]
) -> tuple[torch.Tensor, dict[str, object]]:
    """LGI over the devices' uploaded client-partition gradients; the leader goes back down."""
    res = tracker(torch.stack([g.reshape(-1) for g in client_grads]), sizes)
    return res.leader, _diag(res, None)
