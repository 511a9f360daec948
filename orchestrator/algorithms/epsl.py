"""EPSL (Lin et al., TMC 2024): PSL with last-layer gradient aggregation of ratio ``epsl.phi``.

What travels: as in PSL. phi = 0 is PSL bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn import Module
from torch.optim import Optimizer

from orchestrator.algorithms.base import Rule, ServerPart, ServerStepResult, Tensors
from orchestrator.config.manifest import Manifest


def epsl_server_step(
    server: Module, optimizer: Optimizer, activations: Tensors, labels: Tensors, phi: float
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


class Epsl(Rule):
    name = "epsl"
    uniform_batches = True  # position j of every device's batch is averaged

    def __init__(self, m: Manifest) -> None:
        super().__init__(m)
        self.phi = m.epsl.phi

    def server_step(self, part: ServerPart, acts: Tensors, labels: Tensors) -> ServerStepResult:
        return epsl_server_step(part.module, part.optimizer, acts, labels, self.phi)
