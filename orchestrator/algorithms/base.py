"""Server-side training rules over tensors, with no I/O: the distributed orchestrator and an
in-process engine call the same functions.

PSL (parallel split learning): one shared server partition. Each device i uploads activations
``a_i`` of a batch of ``b_i`` samples; the server minimises the batch-weighted mean loss
``L = sum_i (b_i / B) * l_i`` with one optimizer step, and returns to device i the gradient of
*its own* mean loss, ``dl_i/da_i``, so a device's step size does not shrink with fleet size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ServerStepResult:
    grads: list[torch.Tensor]  # dl_i/da_i, one per device, shaped like its activations
    losses: list[float]  # l_i, device i's mean loss on its batch
    loss: float  # L, the batch-weighted mean
    diag: dict[str, object] = field(default_factory=dict)  # leaders, cosines, ... for the records


def psl_backward(
    server: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
) -> ServerStepResult:
    """PSL's backward without the optimizer step: fills the server's ``.grad`` with the
    gradient of L and returns each device's dl_i/da_i. Every server rule starts from this, so
    each reproduces PSL bit for bit when its own term is switched off."""
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
    losses, grads, start = [], [], 0
    for leaf, b in zip(leaves, sizes):
        losses.append(float(per_sample[start : start + b].detach().mean()))
        assert leaf.grad is not None
        grads.append(leaf.grad * (total / b))  # d(l_i)/d(a_i) = (B / b_i) * dL/da_i
        start += b
    return ServerStepResult(grads=grads, losses=losses, loss=float(loss.detach()))


def psl_server_step(
    server: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
) -> ServerStepResult:
    """One PSL server update on the devices' activations; returns their activation gradients."""
    result = psl_backward(server, optimizer, activations, labels)
    optimizer.step()
    return result


def epsl_server_step(
    server: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    activations: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    phi: float,
) -> ServerStepResult:
    """EPSL (Lin et al., TMC 2024): PSL with last-layer gradient aggregation of ratio ``phi``.

    Our reading: for the first ``round(phi * b)`` positions of every device's batch, the loss
    gradient at the server's output layer is averaged across devices (position j of every device
    gets the mean of their j-th gradients) before back-propagation; the rest stays per device.
    phi = 0 is PSL bit for bit (the same backward, split at the logits).
    """
    sizes = [len(y) for y in labels]
    if len(set(sizes)) != 1:
        raise ValueError("EPSL aggregates position-wise: every device needs the same batch size")
    leaves = [a.detach().requires_grad_(True) for a in activations]
    total, b, n = sum(sizes), sizes[0], len(sizes)
    server.train()
    optimizer.zero_grad(set_to_none=True)
    logits = server(torch.cat(leaves))
    per_sample = F.cross_entropy(logits, torch.cat(list(labels)), reduction="none")
    loss = per_sample.mean()
    (d_logits,) = torch.autograd.grad(loss, logits, retain_graph=True)
    k = int(round(phi * b))
    if k > 0:
        per_device = d_logits.view(n, b, -1)
        shared = per_device[:, :k].mean(dim=0, keepdim=True).expand(n, k, -1)
        d_logits = torch.cat([shared, per_device[:, k:]], dim=1).reshape_as(d_logits)
    logits.backward(d_logits)
    optimizer.step()
    losses = [float(per_sample[i * b : (i + 1) * b].detach().mean()) for i in range(n)]
    grads: list[torch.Tensor] = [leaf.grad * (total / b) for leaf in leaves]  # type: ignore[operator,misc]
    return ServerStepResult(
        grads=grads, losses=losses, loss=float(loss.detach()), diag={"phi": phi}
    )


def fedavg(
    states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of client partitions (SplitFed): sum_i w_i * theta_i / sum_i w_i."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state")
    total = float(sum(weights))
    out = {}
    for name in states[0]:
        acc = torch.zeros_like(states[0][name], dtype=torch.float64)
        for state, w in zip(states, weights):
            acc += state[name].to(torch.float64) * (w / total)
        out[name] = acc.to(states[0][name].dtype)
    return out


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


def client_spread(states: Sequence[Mapping[str, np.ndarray]]) -> float | None:
    """How far apart the client partitions are: mean pairwise distance / mean norm.

    0 when every device holds the same partition (SFL right after averaging, client FedSGD);
    the drift that aggregation-free training lets grow. One Gram matrix, not N^2 differences.
    """
    if len(states) < 2:
        return None
    flat = np.stack(
        [np.concatenate([np.ravel(v).astype(np.float64) for v in w.values()]) for w in states]
    )
    gram = flat @ flat.T
    sq = np.diag(gram)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2 * gram, 0.0, None)
    n = len(flat)
    iu = np.triu_indices(n, k=1)
    norm = float(np.sqrt(sq).mean())
    return float(np.sqrt(d2[iu]).mean()) / norm if norm > 0 else None
