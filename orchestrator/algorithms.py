"""Server-side training rules over tensors, with no I/O: the distributed orchestrator and an
in-process engine call the same functions.

PSL (parallel split learning): one shared server partition. Each device i uploads activations
``a_i`` of a batch of ``b_i`` samples; the server minimises the batch-weighted mean loss
``L = sum_i (b_i / B) * l_i`` with one optimizer step, and returns to device i the gradient of
*its own* mean loss, ``dl_i/da_i``, so a device's step size does not shrink with fleet size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ServerStepResult:
    grads: list[torch.Tensor]  # dl_i/da_i, one per device, shaped like its activations
    losses: list[float]  # l_i, device i's mean loss on its batch
    loss: float  # L, the batch-weighted mean


def psl_server_step(
    server: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
) -> ServerStepResult:
    """One PSL server update on the devices' activations; returns their activation gradients."""
    if not activations or len(activations) != len(labels):
        raise ValueError("need one label tensor per activation tensor, and at least one device")
    leaves = [a.detach().requires_grad_(True) for a in activations]
    sizes = [len(y) for y in labels]
    total = sum(sizes)
    server.train()
    optimizer.zero_grad(set_to_none=True)
    # One forward over the concatenated batch: the server partition has no cross-sample
    # layers (GroupNorm, not BatchNorm), so this equals per-device forwards and is faster.
    logits = server(torch.cat(leaves))
    per_sample = F.cross_entropy(logits, torch.cat(list(labels)), reduction="none")
    loss = per_sample.mean()  # == sum_i (b_i / B) * l_i
    loss.backward()
    optimizer.step()
    losses, grads, start = [], [], 0
    for leaf, b in zip(leaves, sizes):
        losses.append(float(per_sample[start : start + b].detach().mean()))
        assert leaf.grad is not None
        grads.append(leaf.grad * (total / b))  # d(l_i)/d(a_i) = (B / b_i) * dL/da_i
        start += b
    return ServerStepResult(grads=grads, losses=losses, loss=float(loss.detach()))


@torch.no_grad()
def evaluate(
    client: torch.nn.Module,
    server: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """Accuracy and mean loss of ``server(client(x))`` on a test set."""
    client.eval()
    server.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logits = server(client(xb))
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    n = max(len(y), 1)
    return correct / n, loss_sum / n
