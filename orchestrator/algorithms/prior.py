"""Label-prior-corrected activation gradients (FedLC / FedRS style, our reading for split learning).

Device i's labels follow its own skewed prior πᵢ; trained on them, its client layers learn that
prior as much as the task. The server can take the prior out of what it sends down: device i
receives the gradient of the logit-adjusted loss ``CE(z + tau * log(pi_i), y)`` with respect to
its activations, while the server's own update stays PSL's (the plain loss). ``tau = 0`` sends
PSL's gradients, bit for bit. What travels: nothing new — the server knows every device's label
counts from the partition it made.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PRIOR_SMOOTHING = 1.0  # Laplace counts: a class a device never sees gets a finite log prior


def log_priors(label_sets: Sequence[np.ndarray], num_classes: int) -> torch.Tensor:
    """log πᵢ per device (N x classes), from the labels of each device's shard."""
    counts = np.stack([np.bincount(y, minlength=num_classes) for y in label_sets]) + PRIOR_SMOOTHING
    return torch.from_numpy(np.log(counts / counts.sum(axis=1, keepdims=True)))


def prior_corrected_grads(
    server: torch.nn.Module,
    activations: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    priors: torch.Tensor,
    tau: float,
) -> list[torch.Tensor]:
    """d CE(z_i + tau log pi_i, y_i) / d a_i for every device i (row i of ``priors``), each
    device's own mean loss, as PSL returns it. The server's parameters' ``.grad`` is untouched."""
    leaves = [a.detach().requires_grad_(True) for a in activations]
    logits = server(torch.cat(leaves))
    shift = torch.cat(
        [priors[i].to(logits.dtype).expand(len(y), -1) for i, y in enumerate(labels)]
    ).to(logits.device)
    per_sample = F.cross_entropy(logits + tau * shift, torch.cat(list(labels)), reduction="none")
    sizes = [len(y) for y in labels]
    loss = torch.stack([part.mean() for part in torch.split(per_sample, sizes)]).sum()
    grads = torch.autograd.grad(loss, leaves)
    return [g.detach() for g in grads]
