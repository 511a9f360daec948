"""Gradient direction alignment formulas (GDA), pure tensor code shared by device and server.

``first_order`` keeps a gradient's length and turns it toward the leader,
``(1 - lam) * g + lam * |g| * g_L / |g_L|``; ``pull`` moves it toward the leader vector,
``(1 - lam) * g + lam * g_L``. Both act on the last dimension, so a batch of per-device
gradients (N x D) aligns in one call. ``lam = 0`` returns ``g`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

EPS = 1e-12
MODES = ("exact", "first_order", "pull")


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


def alignment_penalty(g: torch.Tensor, leader: torch.Tensor) -> torch.Tensor:
    """The exact mode's regulariser ``1 - cos(g, g_L)`` with the leader held constant."""
    return 1.0 - cosine(g, leader.detach())


def flat_grad(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """All parameters' gradients as one vector (zeros where a parameter has none)."""
    parts = [
        p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
        for p in params
    ]
    return torch.cat(parts)


def set_flat_grad(params: Iterable[torch.nn.Parameter], flat: torch.Tensor) -> None:
    """Write a vector back into the parameters' ``.grad`` (the inverse of :func:`flat_grad`)."""
    params = list(params)
    total = sum(p.numel() for p in params)
    if total != flat.numel():  # checked first: a mismatch must not leave half the grads written
        raise ValueError(f"flat gradient has {flat.numel()} values, parameters hold {total}")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
