"""The server-side rules as tensor code: PSL's per-device activation gradients, LGI's leader set
and EMA, GDA raising alignment, lam = 0 reproducing PSL bit for bit in every mode and space
(server, cut and, through the device trainer, client), EPSL's phi, FedAvg and evaluation."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_agent.align import alignment_penalty, blend, cosine
from edge_agent.data import load_dataset
from edge_agent.trainer import ClientTrainer
from edge_agent.weights import state_to_numpy
from models import build_split
from orchestrator.algorithms.gapsl import gapsl_server_step
from orchestrator.algorithms.lgi import LeaderTracker, client_alignment
from orchestrator.algorithms.psl import psl_server_step

MODES = ("exact", "first_order", "pull")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only adds synchronisation (10-50x slower on a busy
    2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _server(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_split("digits_cnn").server  # takes 16 x 8 x 8 cut activations


def _batches(seed: int, sizes: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Cut activations and non-IID labels: device i sees mostly classes {2i, 2i + 1}."""
    gen = torch.Generator().manual_seed(seed)
    acts = [torch.randn(b, 16, 8, 8, generator=gen) for b in sizes]
    labels = [(2 * i + torch.randint(0, 3, (b,), generator=gen)) % 10 for i, b in enumerate(sizes)]
    return acts, labels


def _sgd(model: torch.nn.Module, lr: float = 0.05, momentum: float = 0.9) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=1e-4)


def _server_grads(
    server: torch.nn.Module, acts: list[torch.Tensor], labels: list[torch.Tensor]
) -> torch.Tensor:
    """Per-device server-space gradients g_i = d l_i / d w, flattened (N x P)."""
    params = [p for p in server.parameters() if p.requires_grad]
    rows = []
    for a, y in zip(acts, labels):
        g = torch.autograd.grad(F.cross_entropy(server(a), y), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --- PSL ---------------------------------------------------------------------------------------


def test_psl_returns_each_devices_own_mean_loss_gradient() -> None:
    sizes = [8, 16, 24]  # unequal on purpose: the B / b_i rescaling must be right
    acts, labels = _batches(1, sizes)
    server = _server()
    reference = copy.deepcopy(server)
    result = psl_server_step(server, torch.optim.SGD(server.parameters(), lr=0.1), acts, labels)
    for a, y, g, loss in zip(acts, labels, result.grads, result.losses):
        leaf = a.clone().requires_grad_(True)
        own = F.cross_entropy(reference(leaf), y)
        (expected,) = torch.autograd.grad(own, leaf)
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7)
        assert loss == pytest.approx(float(own.detach()), rel=1e-6)
    total = sum(sizes)
    weighted = sum(b / total * loss for b, loss in zip(sizes, result.losses))
    assert result.loss == pytest.approx(weighted, rel=1e-6)
    # The server took one plain SGD step on the batch-weighted mean loss.
    mean_loss = F.cross_entropy(reference(torch.cat(acts)), torch.cat(labels))
    grads = torch.autograd.grad(mean_loss, list(reference.parameters()))
    for p, q, d in zip(server.parameters(), reference.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * d, rtol=1e-5, atol=1e-7)


# --- LGI ---------------------------------------------------------------------------------------

ALIGNED, OPPOSED = [0, 2, 3, 5, 7], [1, 4, 6]
SIZES = [10, 20, 30, 40, 50, 60, 70, 80]


def _consensus_grads(seed: int = 0, d: int = 40) -> torch.Tensor:
    """Five noisy copies of one direction and three of its opposite, interleaved."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    g = torch.empty(8, d, dtype=torch.float64)
    for i in range(8):
        sign = 1.0 if i in ALIGNED else -1.0
        g[i] = sign * direction + 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    return g


def _weighted_mean(g: torch.Tensor, members: list[int]) -> torch.Tensor:
    """The leader by hand: sum_i b_i g_i / sum_i b_i over the set."""
    return torch.stack([SIZES[i] * g[i] for i in members]).sum(0) / sum(SIZES[i] for i in members)


def test_lgi_picks_the_consistent_set_and_weights_it_by_batch_size() -> None:
    g = _consensus_grads()
    res = LeaderTracker(tau=0.0, rho=0.5, beta=0.9)(g, SIZES)
    assert res.leaders == ALIGNED
    unit = g / g.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    torch.testing.assert_close(res.cos, cos)
    expected_scores = torch.stack([(cos[i].sum() - cos[i, i]) / 7 for i in range(8)])
    torch.testing.assert_close(res.scores, expected_scores)
    hand = _weighted_mean(g, ALIGNED)
    torch.testing.assert_close(res.leader, hand)
    assert res.align_before == pytest.approx(float(cosine(g, hand[None, :]).mean()))


def test_lgi_rho_one_takes_everyone_and_a_high_tau_tops_up_by_score() -> None:
    g = _consensus_grads()
    everyone = LeaderTracker(tau=0.0, rho=1.0)(g, SIZES)
    assert everyone.leaders == list(range(8))
    torch.testing.assert_close(everyone.leader, _weighted_mean(g, list(range(8))))
    # Nobody reaches tau = 0.99: the set is the ceil(0.25 * 8) = 2 best scores.
    topped = LeaderTracker(tau=0.99, rho=0.25)(g, SIZES)
    best = sorted(range(8), key=lambda i: -float(topped.scores[i]))[:2]
    assert topped.leaders == sorted(best)
    assert set(topped.leaders) <= set(ALIGNED)


def test_lgi_ema_blends_the_previous_leader_with_the_current_one() -> None:
    tracker = LeaderTracker(tau=0.0, rho=1.0, beta=0.9)
    first = tracker(_consensus_grads(0), SIZES).leader.clone()
    g2 = _consensus_grads(1)
    second = tracker(g2, SIZES).leader
    torch.testing.assert_close(second, 0.9 * first + 0.1 * _weighted_mean(g2, list(range(8))))
    assert tracker.ema is not None and torch.equal(tracker.ema, second)


def test_lgi_with_one_device_leads_with_its_gradient() -> None:
    g = torch.tensor([[3.0, -4.0]])
    res = LeaderTracker()(g, [5])
    assert res.leaders == [0]
    torch.testing.assert_close(res.leader, g[0])


def test_client_alignment_runs_lgi_on_flattened_client_gradients() -> None:
    g = _consensus_grads()
    shaped = [row.reshape(5, 8) for row in g]
    leader, diag = client_alignment(LeaderTracker(tau=0.0, rho=0.5), shaped, SIZES, "exact", 1.0)
    assert diag["leaders"] == ALIGNED and diag["align_after"] is None  # the device's to know
    torch.testing.assert_close(leader, LeaderTracker(tau=0.0, rho=0.5)(g, SIZES).leader)


@pytest.mark.parametrize("mode", ["first_order", "pull"])
def test_client_alignment_reports_the_alignment_the_devices_step_by(mode: str) -> None:
    g = _consensus_grads()
    leader, diag = client_alignment(LeaderTracker(tau=0.0, rho=0.5), list(g), SIZES, mode, 0.5)
    after = diag["align_after"]
    # What each device does with its upload and the leader (edge_agent.trainer.align).
    stepped = torch.stack([blend(mode, row, leader, 0.5) for row in g])
    assert isinstance(after, float) and isinstance(diag["align_before"], float)
    assert after == pytest.approx(float(cosine(stepped, leader[None, :]).mean()), abs=1e-6)
    assert after > diag["align_before"]


# --- GDA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["first_order", "pull"])
@pytest.mark.parametrize("space", ["server", "cut"])
def test_blend_modes_raise_alignment_to_the_leader(space: str, mode: str) -> None:
    acts, labels = _batches(2, [16, 16, 16, 16])
    server = _server()
    result = gapsl_server_step(
        server, _sgd(server), acts, labels, LeaderTracker(rho=0.5), space, mode, 0.5
    )
    diag = result.diag
    assert isinstance(diag["align_after"], float) and isinstance(diag["align_before"], float)
    assert diag["align_after"] > diag["align_before"]
    assert all(0 <= i < 4 for i in diag["leaders"])  # type: ignore[attr-defined]


def test_exact_server_step_turns_gradients_toward_the_leader_more_than_psl() -> None:
    """One small plain-SGD step from the same weights: PSL's, and PSL's plus lam * penalty's.

    The loss term dominates a step, so both may lower the cosine; the regularised one must
    raise it relative to PSL, and the penalty's share of the step alone must raise it outright.
    """
    acts, labels = _batches(3, [16, 16, 16, 16])
    start = _server()
    leader = LeaderTracker(rho=0.5)(_server_grads(start, acts, labels), [16] * 4).leader

    def alignment(server: torch.nn.Module) -> float:
        return float(cosine(_server_grads(server, acts, labels), leader[None, :]).mean())

    plain, regular, penalty_only = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    lr = 0.01
    psl_server_step(plain, torch.optim.SGD(plain.parameters(), lr=lr), acts, labels)
    gapsl_server_step(
        regular,
        torch.optim.SGD(regular.parameters(), lr=lr),
        acts,
        labels,
        LeaderTracker(rho=0.5),  # a fresh tracker finds the same leader on its first call
        "server",
        "exact",
        1.0,
    )
    with torch.no_grad():  # start + (regular - plain): the step the penalty alone contributes
        for p, r, q in zip(penalty_only.parameters(), regular.parameters(), plain.parameters()):
            p.add_(r - q)
    before = alignment(start)
    assert alignment(regular) - before > alignment(plain) - before
    assert alignment(penalty_only) > before


@pytest.mark.parametrize("space", ["server", "cut"])
def test_exact_mode_adds_lambda_times_the_penalty_gradient_to_activation_gradients(
    space: str,
) -> None:
    """Device i's activation gradient is d(l_i + lam * (1 - cos(g_i, g_L)))/d a_i."""
    acts, labels = _batches(4, [8, 12, 16])
    start, lam = _server(), 0.3
    plain, regular = copy.deepcopy(start), copy.deepcopy(start)
    psl = psl_server_step(plain, _sgd(plain), acts, labels)
    tracker = LeaderTracker(rho=0.5)
    out = gapsl_server_step(regular, _sgd(regular), acts, labels, tracker, space, "exact", lam)
    assert tracker.ema is not None
    leader = tracker.ema
    params = list(start.parameters())
    for i, (a, y) in enumerate(zip(acts, labels)):
        leaf = a.clone().requires_grad_(True)
        loss_i = F.cross_entropy(start(leaf), y)
        if space == "server":
            g = torch.cat(
                [t.reshape(-1) for t in torch.autograd.grad(loss_i, params, create_graph=True)]
            )
        else:
            g = torch.autograd.grad(loss_i, leaf, create_graph=True)[0].mean(dim=0).reshape(-1)
        (extra,) = torch.autograd.grad(alignment_penalty(g, leader), leaf)
        torch.testing.assert_close(out.grads[i], psl.grads[i] + lam * extra, rtol=1e-4, atol=1e-7)
    assert out.losses == psl.losses and out.loss == psl.loss


# --- lam = 0 is PSL bit for bit ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("space", ["server", "cut"])
def test_lambda_zero_is_psl_bit_for_bit_on_the_server(space: str, mode: str) -> None:
    psl_server, gapsl_server = _server(5), _server(5)
    psl_opt, gapsl_opt = _sgd(psl_server), _sgd(gapsl_server)
    tracker = LeaderTracker(rho=0.5, beta=0.9)
    for step in range(4):
        acts, labels = _batches(100 + step, [8, 16, 8])
        a = psl_server_step(psl_server, psl_opt, acts, labels)
        b = gapsl_server_step(gapsl_server, gapsl_opt, acts, labels, tracker, space, mode, 0.0)
        assert all(torch.equal(x, y) for x, y in zip(a.grads, b.grads)), f"grads, step {step}"
        assert a.losses == b.losses and a.loss == b.loss
        assert _same_params(psl_server, gapsl_server), f"server weights differ after step {step}"


def _client_job(mode: str) -> dict[str, Any]:
    """What ``orchestrator.training.job.job_spec`` sends a device, for a digits run."""
    return {
        "model": "digits_cnn",
        "cut": "default",
        "num_classes": 10,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "seed": 7,
        "rank": 1,
        "gda_mode": mode,
    }


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


# The device's exact mode fills .grad from a create_graph=True backward, whose (differentiable)
# formulas round differently from PSL's plain backward: up to 3e-8 apart after one round.


@pytest.mark.parametrize("mode", ["exact", "first_order", "pull"])
def test_lambda_zero_is_psl_bit_for_bit_in_the_client_space(digits: Any, mode: str) -> None:
    torch.manual_seed(7)
    split = build_split("digits_cnn")
    weights = state_to_numpy(split.client)
    server, opt = split.server, _sgd(split.server)
    shard = np.flatnonzero(digits.y_train < 4)  # a non-IID shard: four classes
    common = (shard, weights, digits.x_train, digits.y_train, digits.normalize, "cpu")
    psl = ClientTrainer(_client_job(""), *common)
    held = ClientTrainer(_client_job(mode), *common)
    gen = torch.Generator().manual_seed(0)
    for r in range(1, 5):
        acts, y, _ = psl.forward(r, 16)
        acts_h, y_h, _ = held.forward(r, 16)
        assert np.array_equal(acts, acts_h) and np.array_equal(y, y_h)
        step = psl_server_step(server, opt, [torch.from_numpy(acts)], [torch.from_numpy(y)])
        grad = step.grads[0].numpy()
        assert psl.backward(r, grad, hold=False)[0] is None
        flat, _ = held.backward(r, grad, hold=True)
        assert flat is not None
        leader = (torch.from_numpy(flat) + torch.randn(flat.shape, generator=gen)).numpy()
        held.align(r, leader, mode, 0.0)
        assert _same_params(psl.model, held.model), f"client weights differ after round {r}"


def test_gapsl_server_step_refuses_the_client_space() -> None:
    acts, labels = _batches(0, [4, 4])
    server = _server()
    with pytest.raises(ValueError, match="client"):
        gapsl_server_step(server, _sgd(server), acts, labels, LeaderTracker(), "client", "pull", 1)
