"""The leader-trajectory anchor (``gapsl.gda_mode = "anchor"``): every device replays the leaders
it receives from the shared initial weights, as its own optimizer would, to get a common moving
reference theta_bar, and steps with g_i + mu (theta_i - theta_bar) (mu = ``gapsl.gda_lambda``).
mu = 0 is PSL bit for bit; devices that receive the same leaders hold the same theta_bar."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.align import cosine
from models import build_split
from orchestrator.config.manifest import ManifestError, parse_manifest

from .test_tracking import _TEXT, _held_round, _simulate, _trainer

ANCHOR = ["training.algorithm=gapsl", "gapsl.gda_mode=anchor", "gapsl.prior_tau=0"]


def _flat(t: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in t.parameters()])


def test_mu_zero_is_psl_bit_for_bit(tmp_path: Path) -> None:
    psl_metrics, psl_rounds = _simulate(tmp_path, "psl", ["training.algorithm=psl"])
    zero, zero_rounds = _simulate(tmp_path, "anchor-0", [*ANCHOR, "gapsl.gda_lambda=0"])
    keys = ("acc_mean", "acc_min", "acc_max", "loss", "client_spread")
    assert [[r[k] for k in keys] for r in psl_metrics] == [[r[k] for k in keys] for r in zero]
    assert [r["loss"] for r in psl_rounds] == [r["loss"] for r in zero_rounds]
    anchored, _ = _simulate(tmp_path, "anchor-1", ANCHOR)
    assert [r["acc_mean"] for r in anchored] != [r["acc_mean"] for r in psl_metrics]


def test_each_step_pulls_toward_the_replayed_leaders() -> None:
    """No momentum: theta_bar_t = theta_0 - lr * sum of the leaders before round t, and the
    device's step is -lr * (g + mu * (theta - theta_bar_t))."""
    torch.manual_seed(1)
    server = build_split("digits_mlp", "fc2").server
    t, mu, lr = _trainer(0.0, "anchor"), 0.6, 0.1
    bar = _flat(t.model).clone()
    gen = torch.Generator().manual_seed(5)
    for r in range(1, 5):
        g = torch.from_numpy(_held_round(t, server, r).copy())
        leader = torch.randn(g.shape, generator=gen)
        before = _flat(t.model)
        t.align(r, leader.numpy(), "anchor", mu)
        stepped = g + mu * (before - bar)
        torch.testing.assert_close(_flat(t.model), before - lr * stepped)
        # what the device reports with its next upload: cos of what it stepped by to g_L
        assert t.aligned is not None and t.aligned[0] == r
        assert t.aligned[1] == pytest.approx(float(cosine(stepped, leader)), abs=1e-5)
        assert t.aligned_report() == {"round": r, "cos": t.aligned[1]}
        bar = bar - lr * leader


def test_devices_with_other_data_share_the_reference_and_keep_it_across_a_restart() -> None:
    """theta_bar depends only on the leaders (and the shared start), not on a device's data or
    its own steps; with momentum its replay keeps a momentum buffer of its own, checkpointed."""
    torch.manual_seed(1)
    server = build_split("digits_mlp", "fc2").server
    low = _trainer(0.0, "anchor", momentum=0.9, labels=3)
    high = _trainer(0.0, "anchor", momentum=0.9, labels=-7)
    gen = torch.Generator().manual_seed(2)
    for r in (1, 2, 3):
        flats = [_held_round(t, server, r) for t in (low, high)]
        leader = torch.randn(flats[0].shape, generator=gen).numpy()
        for t in (low, high):
            t.align(r, leader, "anchor", 1.0)
    assert not torch.equal(_flat(low.model), _flat(high.model))  # their own data moved them
    restarted = _trainer(0.0, "anchor", momentum=0.9, labels=3)
    restarted.restore(copy.deepcopy(low.checkpoint()))  # as written to disk and read back
    trajectories = [t._trajectory for t in (low, high, restarted)]
    assert all(tr is not None for tr in trajectories)
    for bar_a, bar_b, bar_c in zip(*(tr.bar for tr in trajectories if tr is not None)):
        assert torch.equal(bar_a, bar_b) and torch.equal(bar_a, bar_c)
    leader = np.ones_like(leader)
    for t in (low, restarted):
        _held_round(t, server, 4)
        t.align(4, leader, "anchor", 1.0)
    assert torch.equal(_flat(low.model), _flat(restarted.model))


@pytest.mark.parametrize("overrides", [["gapsl.space=server"], ["gapsl.leader=update"]])
def test_the_anchor_outside_the_client_space_names_the_key(overrides: list[str]) -> None:
    with pytest.raises(ManifestError, match=r"\[gapsl\]\.gda_mode: \"anchor\""):
        parse_manifest(_TEXT, overrides=[*ANCHOR, *overrides])
