"""The leader-trajectory anchor's common reference (``gapsl.gda_mode = "anchor"``).

theta_bar starts as the job's identical initial weights and moves by every leader the device
receives, with an optimizer of the device's own kind (the same SGD, momentum, weight decay and
rate), so every device that receives the same leaders holds the same theta_bar whatever its data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .weights import set_flat_grad


class LeaderTrajectory:
    """theta_bar and its optimizer; the device adds ``mu * (theta - theta_bar)`` to its gradient."""

    def __init__(
        self, params: Sequence[torch.Tensor], lr: float, momentum: float, weight_decay: float
    ) -> None:
        self.bar = [p.detach().clone() for p in params]
        self._opt = torch.optim.SGD(self.bar, lr=lr, momentum=momentum, weight_decay=weight_decay)

    @torch.no_grad()
    def pull(self, params: Sequence[torch.nn.Parameter], mu: float) -> None:
        """Add mu * (theta - theta_bar) to ``.grad``: the gradient of mu/2 |theta - theta_bar|^2,
        theta_bar as it stands before this round's leader. mu = 0 leaves .grad untouched."""
        if mu == 0:  # PSL bit for bit
            return
        for p, b in zip(params, self.bar):
            if p.grad is not None:
                p.grad.add_(p - b, alpha=mu)

    def replay(self, leader: torch.Tensor, lr: float) -> None:
        """Move theta_bar by the leader, as the device's optimizer would at rate ``lr``."""
        set_flat_grad(self.bar, leader.to(self.bar[0].dtype))
        for group in self._opt.param_groups:
            group["lr"] = lr
        self._opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "bar": [b.detach().cpu().clone() for b in self.bar],
            "optimizer": self._opt.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for b, saved in zip(self.bar, state["bar"], strict=True):
            b.copy_(saved)
        self._opt.load_state_dict(state["optimizer"])
