"""Scoring an aggregation-free fleet: every device's (client ∘ server) model on the common test
set, and how far apart the client partitions have drifted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edge_agent.weights import load_numpy_state


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


# Device models scored in one batched pass hold this much of their client output at a time.
MANY_BYTES = 64 << 20


@torch.no_grad()
def evaluate_many(
    client: torch.nn.Module,
    server: torch.nn.Module,
    states: Sequence[Mapping[str, np.ndarray]],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
) -> list[tuple[float, float]]:
    """:func:`evaluate` of ``server(client_i(x))`` for every client state ``i`` at once.

    The client partitions run batched over their stacked weights (``torch.func.vmap``) and the
    shared server partition over all their outputs together: a few large kernels that release
    the GIL instead of a Python loop per device that holds it, which starves the event loop of
    a large fleet. A state that does not fit ``client`` raises RuntimeError or KeyError, as
    loading it would; a model ``vmap`` cannot batch is scored one state at a time.
    """
    template = client.state_dict()
    for w in states:  # the same strictness as load_state_dict(strict=True)
        if set(w) != set(template):
            raise KeyError(f"state keys {sorted(set(w) ^ set(template))} do not match the model")
        for name, t in template.items():
            if tuple(np.shape(w[name])) != tuple(t.shape):
                raise RuntimeError(f"{name}: shape {np.shape(w[name])}, the model has {t.shape}")
    client.eval()
    server.eval()
    try:
        if _batches_well(client):
            return _batched(client, server, states, x, y, batch_size)
    except (RuntimeError, NotImplementedError):  # an op vmap has no batching rule for
        pass
    out = []
    for w in states:
        load_numpy_state(client, w)
        out.append(evaluate(client, server, x, y, batch_size))
    return out


def _batches_well(client: torch.nn.Module) -> bool:
    """Whether batching the client over devices beats scoring them in turn. Linear layers
    become one batched matmul; vmap turns a convolution into a grouped one, measured 2-3x
    slower here than the devices one at a time (digits_cnn, digits_cnn_fc, 64 devices)."""
    return not any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in client.modules())


def _batched(
    client: torch.nn.Module,
    server: torch.nn.Module,
    states: Sequence[Mapping[str, np.ndarray]],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
) -> list[tuple[float, float]]:
    from torch.func import functional_call, vmap

    template = client.state_dict()
    if not states or not len(y):
        return [(0.0, 0.0)] * len(states)
    width = client(x[:1]).numel() * 4  # bytes of one sample's client output
    per_pass = max(1, MANY_BYTES // max(width * min(batch_size, len(y)), 1))

    def run(params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return functional_call(client, params, (xb,))  # type: ignore[no-any-return]

    batched = vmap(run, in_dims=(0, None))
    out: list[tuple[float, float]] = []
    n = len(y)
    for first in range(0, len(states), per_pass):
        chunk = states[first : first + per_pass]
        params = {
            k: torch.from_numpy(np.stack([w[k] for w in chunk])).to(t.device, t.dtype)
            for k, t in template.items()
        }
        correct = torch.zeros(len(chunk), dtype=torch.int64, device=y.device)
        loss_sum = torch.zeros(len(chunk), dtype=torch.float64, device=y.device)
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            acts = batched(params, xb)  # (models, batch, ...)
            k, b = acts.shape[:2]
            logits = server(acts.reshape(k * b, *acts.shape[2:])).reshape(k, b, -1)
            losses = F.cross_entropy(logits.reshape(k * b, -1), yb.repeat(k), reduction="none")
            loss_sum += losses.reshape(k, b).sum(dim=1).double()
            correct += (logits.argmax(dim=2) == yb).sum(dim=1)
        out += [(int(c) / n, float(ls) / n) for c, ls in zip(correct, loss_sum)]
    return out


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
