"""LGI, leader gradient identification: which devices' gradients agree, and the leader they make.

Per-device gradients ``g_i`` (in whatever space the rule works in) are compared by cosine;
devices whose mean cosine to the others reaches ``tau`` form the leader set, topped up by score to
``ceil(rho*N)``; the leader ``g_L`` is their batch-weighted mean, smoothed across rounds by an EMA
``beta`` — "the global convergence trend". docs/algorithms.md states the rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from edge_agent.align import blend, cosine


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


def lgi_diag(res: LgiResult, after: float | None) -> dict[str, object]:
    return {
        "leaders": res.leaders,
        "cos": [[round(float(v), 4) for v in row] for row in res.cos],
        "mean_cos": float(
            (res.cos.sum() - res.cos.diagonal().sum()) / max(res.cos.numel() - len(res.cos), 1)
        ),
        "align_before": res.align_before,
        "align_after": after,
    }


BLENDS = ("first_order", "pull")  # the GDA modes whose aligned gradient is g and g_L alone


@torch.no_grad()
def aligned(
    mode: str, grads: torch.Tensor, leader: torch.Tensor, lam: float
) -> tuple[torch.Tensor, float]:
    """The blended gradients (N x D) and their mean cosine to the leader after GDA."""
    out = blend(mode, grads, leader[None, :], lam)
    return out, float(cosine(out, leader[None, :]).mean())


def client_alignment(
    tracker: LeaderTracker,
    client_grads: Sequence[torch.Tensor],
    sizes: Sequence[int],
    mode: str,
    lam: float,
) -> tuple[torch.Tensor, dict[str, object]]:
    """LGI over the devices' uploaded client-partition gradients; the leader goes back down.

    The devices apply GDA, but for the blend modes what they step by follows from what they
    uploaded and the leader, so ``align_after`` is computed here as in the server space. The
    exact, tracking and anchor modes use state only the device holds (the graph, its reference,
    its anchor): their ``align_after`` stays None rather than a guess. For every mode the devices
    report their own figure with the next upload (the loop's ``align_after_prev``).
    """
    grads = torch.stack([g.reshape(-1) for g in client_grads])
    res = tracker(grads, sizes)
    after = aligned(mode, grads, res.leader, lam)[1] if mode in BLENDS else None
    return res.leader, lgi_diag(res, after)
