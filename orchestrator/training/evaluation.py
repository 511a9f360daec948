"""Scoring an aggregation-free fleet: every device's (client ∘ server) model on the common test
set, and how far apart the client partitions have drifted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


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
