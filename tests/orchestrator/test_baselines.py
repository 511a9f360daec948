"""The baselines' server rules and the shared tensor helpers: EPSL, SplitFed's FedAvg, and the
evaluation of a device's (client ∘ server) model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models import build_split
from orchestrator.algorithms.epsl import epsl_server_step
from orchestrator.algorithms.psl import psl_server_step
from orchestrator.algorithms.sfl import fedavg
from orchestrator.training.evaluation import evaluate
from tests.orchestrator.test_algorithms import (
    _batches,
    _one_torch_thread,
    _same_params,
    _server,
    _sgd,
)

__all__ = ["_one_torch_thread"]  # the module-wide one-thread fixture applies here too


# --- EPSL --------------------------------------------------------------------------------------


def test_epsl_phi_zero_is_psl_bit_for_bit() -> None:
    psl_server, epsl_server = _server(6), _server(6)
    psl_opt, epsl_opt = _sgd(psl_server), _sgd(epsl_server)
    for step in range(4):
        acts, labels = _batches(200 + step, [12, 12, 12])
        a = psl_server_step(psl_server, psl_opt, acts, labels)
        b = epsl_server_step(epsl_server, epsl_opt, acts, labels, 0.0)
        assert all(torch.equal(x, y) for x, y in zip(a.grads, b.grads)), f"grads, step {step}"
        assert a.losses == b.losses and a.loss == b.loss
        assert _same_params(psl_server, epsl_server), f"server weights differ after step {step}"


@pytest.mark.parametrize("phi", [0.5, 1.0])
def test_epsl_shares_the_output_gradient_of_the_first_phi_positions(phi: float) -> None:
    """With a linear server, sharing the logit gradient at position j makes every device's
    activation gradient at j the same: the first round(phi * b) rows agree across devices."""
    torch.manual_seed(0)
    server = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    b = 8
    gen = torch.Generator().manual_seed(1)
    acts = [torch.randn(b, 3, 4, generator=gen) for _ in range(3)]
    labels = [torch.randint(0, 5, (b,), generator=gen) for _ in range(3)]
    reference = copy.deepcopy(server)
    out = epsl_server_step(server, torch.optim.SGD(server.parameters(), lr=0.1), acts, labels, phi)
    psl = psl_server_step(reference, torch.optim.SGD(reference.parameters(), lr=0.1), acts, labels)
    k = round(phi * b)
    for g in out.grads[1:]:
        torch.testing.assert_close(g[:k], out.grads[0][:k])
        if k < b:
            assert not torch.allclose(g[k:], out.grads[0][k:])
    # Shared positions carry the mean over devices of PSL's gradients there; the rest are PSL's.
    mean_shared = torch.stack([g[:k] for g in psl.grads]).mean(dim=0)
    for g, p in zip(out.grads, psl.grads):
        torch.testing.assert_close(g[:k], mean_shared)
        torch.testing.assert_close(g[k:], p[k:])
    assert out.losses == psl.losses  # the reported losses stay each device's own


def test_epsl_with_identical_devices_equals_psl() -> None:
    acts, labels = _batches(9, [10])
    acts, labels = acts * 4, labels * 4  # four devices holding the very same batch
    a_server, b_server = _server(8), _server(8)
    a = psl_server_step(a_server, _sgd(a_server), acts, labels)
    b = epsl_server_step(b_server, _sgd(b_server), acts, labels, 1.0)
    for x, y in zip(a.grads, b.grads):
        torch.testing.assert_close(x, y)
    for p, q in zip(a_server.parameters(), b_server.parameters()):
        torch.testing.assert_close(p, q)


def test_epsl_refuses_unequal_batches() -> None:
    acts, labels = _batches(0, [8, 9])
    server = _server()
    with pytest.raises(ValueError, match="batch size"):
        epsl_server_step(server, _sgd(server), acts, labels, 0.5)


# --- FedAvg and evaluation ---------------------------------------------------------------------


def test_fedavg_is_the_weighted_average_and_keeps_dtypes() -> None:
    gen = torch.Generator().manual_seed(0)
    states = [
        {
            "w": torch.randn(4, 3, generator=gen),
            "d": torch.randn(5, generator=gen, dtype=torch.float64),
            "n": torch.tensor(7, dtype=torch.int64),
        }
        for _ in range(3)
    ]
    weights = [100.0, 300.0, 600.0]
    out = fedavg(states, weights)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in states[0].items()}
    for name in ("w", "d"):
        hand = sum(s[name].double() * w for s, w in zip(states, weights)) / sum(weights)
        torch.testing.assert_close(
            out[name].double(), hand, rtol=1e-6 if name == "w" else 1e-12, atol=0
        )
    assert int(out["n"]) == 7
    with pytest.raises(ValueError):
        fedavg(states, weights[:2])


def test_evaluate_matches_a_direct_computation_across_chunks() -> None:
    torch.manual_seed(0)
    split = build_split("digits_cnn")
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 1, 8, 8, generator=gen), torch.randint(0, 10, (50,), generator=gen)
    acc, loss = evaluate(split.client, split.server, x, y, batch_size=16)  # four chunks
    with torch.no_grad():
        logits = split.server(split.client(x))
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert not split.client.training and not split.server.training
