"""The stability guard: a warning a person can see when a device's training runs away.

Each round the server knows every device's loss and the activation gradient it sends back. A
loss that is not finite, that jumps far above the device's own running mean, or an activation
gradient whose norm does the same, is the start of a divergence; the loop writes an ``unstable``
event for that device (the dashboard marks it) and goes on: the guard watches, it never steers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

LOSS_FACTOR = 4.0  # a loss this many times the device's running mean is exploding ...
CHANCE_FACTOR = 2.0  # ... once it is also this many times a uniform guess's, ln(classes): a
# converged device's batch loss can jump 4x its small mean and still be far from diverging
GRAD_FACTOR = 10.0  # ... and an activation gradient norm this many times its mean runs away
WARMUP_ROUNDS = 5  # rounds of a device's own before its means are trusted
SMOOTHING = 0.1  # weight of a new round in the running means: slow, so a runaway stands out
QUIET_ROUNDS = 20  # a device warned once is not warned again for this many rounds


class StabilityGuard:
    """Running means of each device's loss and gradient norm, and the warnings they give."""

    def __init__(self, num_classes: int) -> None:
        self.loss_floor = CHANCE_FACTOR * math.log(max(num_classes, 2))
        self.loss: dict[str, float] = {}
        self.grad: dict[str, float] = {}
        self.rounds: dict[str, int] = {}
        self.warned: dict[str, int] = {}

    def check(
        self, r: int, losses: Mapping[str, float], grad_norms: Mapping[str, float]
    ) -> list[tuple[str, dict[str, Any]]]:
        """The ``unstable`` events of round r: (device, fields) for each device warned."""
        out = []
        for i, loss in losses.items():
            norm = grad_norms.get(i, 0.0)
            why = self._why(i, loss, norm)
            if why and r - self.warned.get(i, -QUIET_ROUNDS) >= QUIET_ROUNDS:
                self.warned[i] = r
                out.append((i, {"round": r, "why": why, "loss": loss, "grad_norm": norm}))
            if math.isfinite(loss) and math.isfinite(norm):
                seen = self.rounds.get(i, 0)
                self.loss[i] = loss if seen == 0 else _ema(self.loss[i], loss)
                self.grad[i] = norm if seen == 0 else _ema(self.grad[i], norm)
                self.rounds[i] = seen + 1
        return out

    def _why(self, i: str, loss: float, norm: float) -> str:
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return "loss or gradient not finite"
        if self.rounds.get(i, 0) < WARMUP_ROUNDS:
            return ""
        if loss > max(LOSS_FACTOR * self.loss[i], self.loss_floor):
            return f"loss {loss / self.loss[i]:.0f}x its running mean"
        if norm > GRAD_FACTOR * self.grad[i]:
            return f"gradient norm {norm / self.grad[i]:.0f}x its running mean"
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "grad": self.grad, "rounds": self.rounds, "warned": self.warned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loss, self.grad = dict(state["loss"]), dict(state["grad"])
        self.rounds, self.warned = dict(state["rounds"]), dict(state["warned"])


def _ema(old: float, new: float) -> float:
    return (1.0 - SMOOTHING) * old + SMOOTHING * new
