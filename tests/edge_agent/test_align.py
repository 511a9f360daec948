"""The GDA formulas in ``edge_agent.align``: what each blend does to a gradient's length and
direction, and that lam = 0 leaves a gradient untouched bit for bit."""

from __future__ import annotations

import pytest
import torch

from edge_agent.align import alignment_penalty, blend, cosine

BLENDS = ("first_order", "pull")


def _pair(seed: int, n: int = 6, d: int = 17) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of gradients (n x d) and a leader (1 x d), in float64 so ordering checks are clean."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, d, generator=gen, dtype=torch.float64)
    leader = torch.randn(1, d, generator=gen, dtype=torch.float64)
    return g, leader


@pytest.mark.parametrize("seed", range(5))
def test_first_order_at_one_keeps_the_norm_and_takes_the_leaders_direction(seed: int) -> None:
    g, leader = _pair(seed)
    out = blend("first_order", g, leader, 1.0)
    torch.testing.assert_close(out.norm(dim=-1), g.norm(dim=-1))
    torch.testing.assert_close(cosine(out, leader), torch.ones(len(g), dtype=g.dtype))


@pytest.mark.parametrize("mode", BLENDS)
@pytest.mark.parametrize("seed", range(5))
def test_cosine_to_the_leader_rises_monotonically_with_lambda(mode: str, seed: int) -> None:
    g, leader = _pair(seed)
    lams = [i / 10 for i in range(11)]
    cos = torch.stack([cosine(blend(mode, g, leader, lam), leader) for lam in lams])  # 11 x n
    steps = cos[1:] - cos[:-1]
    assert bool((steps >= -1e-12).all()), f"cosine fell somewhere along lambda: {steps.min()}"
    # Strictly better at the end for every vector that did not already point along the leader.
    assert bool((cos[-1] > cos[0]).all())


@pytest.mark.parametrize("seed", range(3))
def test_pull_at_one_returns_the_leader(seed: int) -> None:
    g, leader = _pair(seed)
    out = blend("pull", g.float(), leader.float(), 1.0)
    assert torch.equal(out, leader.float().expand_as(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", BLENDS)
def test_lambda_zero_returns_the_gradient_bit_for_bit(mode: str, dtype: torch.dtype) -> None:
    g, leader = _pair(11)
    g, leader = g.to(dtype) * 1e-3, leader.to(dtype) * 1e3  # very different scales on purpose
    assert torch.equal(blend(mode, g, leader, 0.0), g)
    # A single flat vector (the client space) as well as a batch.
    assert torch.equal(blend(mode, g[0], leader[0], 0.0), g[0])


def test_blend_rejects_the_exact_mode_and_unknown_names() -> None:
    g, leader = _pair(0)
    for mode in ("exact", "average", ""):
        with pytest.raises(ValueError, match="mode"):
            blend(mode, g, leader, 0.5)


def test_cosine_of_zero_vectors_is_zero_never_nan() -> None:
    zero, x = torch.zeros(5), torch.arange(1.0, 6.0)
    for a, b in ((zero, x), (x, zero), (zero, zero)):
        value = cosine(a, b)
        assert not torch.isnan(value)
        assert float(value) == 0.0
    # Batched, with one zero row among ordinary ones.
    batch = torch.stack([zero, x, -x])
    torch.testing.assert_close(cosine(batch, x[None, :]), torch.tensor([0.0, 1.0, -1.0]))


def test_blends_and_penalty_stay_finite_at_zero() -> None:
    zero, x = torch.zeros(1, 4), torch.ones(1, 4)
    for mode in BLENDS:
        for g, leader in ((zero, x), (x, zero), (zero, zero)):
            assert torch.isfinite(blend(mode, g, leader, 0.5)).all()
    # The exact mode differentiates the penalty; its gradient at a zero gradient must be finite.
    g = torch.zeros(4, requires_grad=True)
    (d,) = torch.autograd.grad(alignment_penalty(g, x[0]), g)
    assert torch.isfinite(d).all()


def test_alignment_penalty_is_one_minus_cosine_and_holds_the_leader_constant() -> None:
    g = torch.tensor([1.0, 0.0, 0.0], requires_grad=True)
    leader = torch.tensor([1.0, 1.0, 0.0], requires_grad=True)
    penalty = alignment_penalty(g, leader)
    torch.testing.assert_close(penalty, torch.tensor(1.0 - 2**-0.5))
    penalty.backward()
    assert leader.grad is None  # detached: only g is pulled
    assert g.grad is not None and float(g.grad.norm()) > 0
