"""Small batches topped up at the server (``scheduler.top_up = "replay"``).

A device that ``latency_balanced`` plans below ``training.batch_size`` sends b_i < b samples,
so in the server's batch-weighted loss its shard weighs b_i / b of what it weighs under uniform
batches: a slow device's data is learnt less by the server, however its own partition steps.
With replay the server appends to such a device's activations its own most recent earlier
samples (activations and labels as they arrived, the last b it sent), up to b in all, so the
server's loss weighs every device as uniform batches do, on real samples of its shard rather
than on a few samples counted several times (weighting the few up instead was measured worse:
docs/results.md, section 2).

*What travels*: nothing more; the replayed rows are the server's copies. The gradient sent
back is of the fresh rows only. *Long-run trajectory*: the server follows SGD on every shard at
uniform-batch weight, each sample of a slow device seen about b / b_i times over consecutive
rounds, its activation up to b / b_i rounds old (the client partition moves in between: the
server learns from slightly stale activations of those samples, as asynchronous split learning
does). Devices at or above b are untouched, so uniform batches are PSL bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Replay:
    """Each device's last ``batch_size`` samples, and the top-up of its next small batch."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # id: (acts, labels)

    def top_up(
        self, ids: Sequence[str], acts: list[torch.Tensor], labels: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, int]]:
        """The server's batches, and for each device topped up its count of fresh rows (they
        come first). Then keeps this round's fresh samples for the rounds after."""
        out_a, out_y, fresh = list(acts), list(labels), {}
        for k, i in enumerate(ids):
            n = len(labels[k])
            held = self.held.get(i)
            if 0 < n < self.batch_size and held is not None:
                extra = min(self.batch_size - n, len(held[1]))
                out_a[k] = torch.cat([acts[k], held[0][-extra:].to(acts[k].dtype)])
                out_y[k] = torch.cat([labels[k], held[1][-extra:]])
                fresh[i] = n
        for k, i in enumerate(ids):
            a, y = acts[k].detach(), labels[k]
            held = self.held.get(i)
            if held is not None:
                a, y = torch.cat([held[0], a]), torch.cat([held[1], y])
            self.held[i] = (a[-self.batch_size :].clone(), y[-self.batch_size :].clone())
        return out_a, out_y, fresh

    def state_dict(self) -> dict[str, Any]:
        return {i: (a.cpu(), y.cpu()) for i, (a, y) in self.held.items()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.held = {i: (a.to(device), y.to(device)) for i, (a, y) in state.items()}
