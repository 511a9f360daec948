"""Gradient direction alignment formulas (GDA), pure tensor code shared by device and server.

``first_order`` keeps a gradient's length and turns it toward the leader,
``(1 - lam) * g + lam * |g| * g_L / |g_L|``; ``pull`` moves it toward the leader vector,
``(1 - lam) * g + lam * g_L``; ``tracking`` adds ``lam * (g_L - r)``, ``r`` the device's own
reference (:func:`track`); ``anchor`` pulls the device's weights toward the leaders' trajectory
(:class:`~edge_agent.trainer.ClientTrainer`, which holds that trajectory). They act on the last dimension, so a batch of per-device
gradients (N x D) aligns in one call. ``lam = 0`` returns ``g`` bit for bit. The flat-vector
forms these act on come from :mod:`edge_agent.weights`.
"""

from __future__ import annotations

import torch

EPS = 1e-12
MODES = ("exact", "first_order", "pull", "tracking", "anchor")


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b) along the last dimension; 0 where either vector is zero (never NaN)."""
    na = a.norm(dim=-1).clamp_min(EPS)
    nb = b.norm(dim=-1).clamp_min(EPS)
    return (a * b).sum(dim=-1) / (na * nb)


def blend(mode: str, g: torch.Tensor, leader: torch.Tensor, lam: float) -> torch.Tensor:
    """The first-order or pull alignment of ``g`` toward ``leader``."""
    if mode == "first_order":
        unit = leader / leader.norm(dim=-1, keepdim=True).clamp_min(EPS)
        return (1.0 - lam) * g + lam * g.norm(dim=-1, keepdim=True) * unit
    if mode == "pull":
        return (1.0 - lam) * g + lam * leader
    raise ValueError(f"blend: mode must be first_order or pull, not {mode!r}")


def track(g: torch.Tensor, leader: torch.Tensor, ref: torch.Tensor, lam: float) -> torch.Tensor:
    """Tracking GDA: ``g + lam * (g_L - r)``, the gradient of the linear direction-aware
    regulariser ``lam * <g_L - r, theta>`` added to the device's own gradient ``g``. ``r``, the
    device's reference for its own gradient, cancels its persistent bias and keeps the fresh part."""
    return g + lam * (leader - ref)


def alignment_penalty(g: torch.Tensor, leader: torch.Tensor) -> torch.Tensor:
    """The exact mode's regulariser ``1 - cos(g, g_L)`` with the leader held constant."""
    return 1.0 - cosine(g, leader.detach())
