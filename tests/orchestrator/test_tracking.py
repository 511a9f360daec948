"""Tracking GDA (``gapsl.gda_mode = "tracking"``): device i steps with g_i + lam (g_L - r_i), r_i an
EMA of its own client gradient. lam = 0 is PSL bit for bit; the reference survives a restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edge_agent.align import cosine
from edge_agent.data import load_dataset
from edge_agent.trainer import ClientTrainer
from edge_agent.weights import flat_grad, state_to_numpy
from models import build_split
from orchestrator.algorithms.psl import psl_server_step
from orchestrator.config.manifest import ManifestError, manifest_to_toml, parse_manifest
from orchestrator.engine import Engine

_TEXT = """
[testbed]
name = "tracking"
listen = "127.0.0.1:0"
[training]
dataset = "digits"
model = "digits_mlp"
cut = "fc2"
rounds = 6
eval_every = 3
[data]
partition = "dirichlet"
alpha = 0.1
""" + "".join(f'[[devices]]\nid = "d{i}"\ntoken = "t"\ndevice = "cpu"\n' for i in range(3))


def _simulate(tmp_path: Path, name: str, overrides: list[str]) -> tuple[list[Any], list[Any]]:
    m = parse_manifest(_TEXT, overrides=overrides)
    out = tmp_path / name
    engine = Engine(m, out, manifest_to_toml(m), run_id=name, in_process=True)
    assert asyncio.run(engine.run()) == "completed"
    read = lambda f: [json.loads(x) for x in (out / f).read_text().splitlines()]  # noqa: E731
    return read("metrics.jsonl"), read("rounds.jsonl")


def test_lambda_zero_is_psl_bit_for_bit(tmp_path: Path) -> None:
    psl_metrics, psl_rounds = _simulate(tmp_path, "psl", ["training.algorithm=psl"])
    zero_metrics, zero_rounds = _simulate(
        tmp_path,
        "tracking-0",
        [
            "training.algorithm=gapsl",
            "gapsl.gda_mode=tracking",
            "gapsl.gda_lambda=0",
            "gapsl.prior_tau=0",
        ],
    )
    keys = ("acc_mean", "acc_min", "acc_max", "loss", "client_spread")
    assert [[r[k] for k in keys] for r in psl_metrics] == [
        [r[k] for k in keys] for r in zero_metrics
    ]
    assert [r["loss"] for r in psl_rounds] == [r["loss"] for r in zero_rounds]


def test_tracking_moves_the_run_and_records_its_leader(tmp_path: Path) -> None:
    plain, _ = _simulate(tmp_path, "psl", ["training.algorithm=psl"])
    tracked, rounds = _simulate(
        tmp_path, "tracking", ["training.algorithm=gapsl", "gapsl.gda_mode=tracking"]
    )
    assert [r["acc_mean"] for r in plain] != [r["acc_mean"] for r in tracked]
    assert all(r["leaders"] for r in rounds)  # LGI ran every round


def _job(beta: float, mode: str, momentum: float) -> dict[str, Any]:
    return {
        "model": "digits_mlp", "cut": "fc2", "num_classes": 10, "lr": 0.1, "momentum": momentum,
        "weight_decay": 0.0, "seed": 3, "rank": 0, "gapsl_space": "client",
        "gda_mode": mode, "track_beta": beta,
    }  # fmt: skip


def _trainer(
    beta: float, mode: str = "tracking", momentum: float = 0.0, labels: int = 3
) -> ClientTrainer:
    """A device holding the digits below ``labels`` (or from it up, if negative)."""
    d = load_dataset("digits")
    torch.manual_seed(0)
    weights = state_to_numpy(build_split("digits_mlp", "fc2").client)
    shard = np.flatnonzero(d.y_train < labels if labels > 0 else d.y_train >= -labels)
    job = _job(beta, mode, momentum)
    return ClientTrainer(job, shard, weights, d.x_train, d.y_train, d.normalize, "cpu")


def _held_round(t: ClientTrainer, server: torch.nn.Module, r: int) -> np.ndarray:
    acts, y, _ = t.forward(r, 16)
    opt = torch.optim.SGD(server.parameters(), lr=0.0)  # the server stays where it is
    step = psl_server_step(server, opt, [torch.from_numpy(acts)], [torch.from_numpy(y)])
    flat, _ = t.backward(r, step.grads[0].numpy(), hold=True)
    assert flat is not None
    return flat


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_each_step_is_the_gradient_plus_lambda_times_leader_minus_reference(beta: float) -> None:
    torch.manual_seed(1)
    server = build_split("digits_mlp", "fc2").server
    t, lam = _trainer(beta), 0.7
    gen = torch.Generator().manual_seed(5)
    ref = None
    for r in range(1, 4):
        g = torch.from_numpy(_held_round(t, server, r).copy())
        leader = torch.randn(g.shape, generator=gen)
        before = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
        t.align(r, leader.numpy(), "tracking", lam)
        after = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
        r_i = g if ref is None else ref  # the first round's reference is its own gradient
        torch.testing.assert_close(after, before - 0.1 * (g + lam * (leader - r_i)))
        torch.testing.assert_close(flat_grad(list(t.model.parameters())), g + lam * (leader - r_i))
        assert t.aligned is not None and t.aligned[0] == r
        assert t.aligned[1] == pytest.approx(float(cosine(g + lam * (leader - r_i), leader)))
        ref = g if ref is None or beta == 0 else beta * ref + (1 - beta) * g


def test_the_reference_survives_a_checkpoint() -> None:
    torch.manual_seed(1)
    server = build_split("digits_mlp", "fc2").server
    going, leader = _trainer(0.5), None
    for r in (1, 2):
        flat = _held_round(going, server, r)
        leader = np.ones_like(flat)
        going.align(r, leader, "tracking", 1.0)
    restarted = _trainer(0.5)
    restarted.restore(going.checkpoint())
    assert leader is not None
    for t in (going, restarted):
        _held_round(t, server, 3)
        t.align(3, leader, "tracking", 1.0)
    for p, q in zip(going.model.parameters(), restarted.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "overrides",
    [["gapsl.space=server"], ["gapsl.space=cut"], ["gapsl.leader=update"]],
)
def test_tracking_outside_the_client_space_names_the_key(overrides: list[str]) -> None:
    with pytest.raises(ManifestError, match=r"\[gapsl\]\.gda_mode: \"tracking\""):
        parse_manifest(
            _TEXT, overrides=["training.algorithm=gapsl", "gapsl.gda_mode=tracking", *overrides]
        )


# --- label-prior-corrected activation gradients (gapsl.prior_tau) ------------------------------


def test_a_zero_prior_correction_is_psl_bit_for_bit(tmp_path: Path) -> None:
    psl_metrics, psl_rounds = _simulate(tmp_path, "psl", ["training.algorithm=psl"])
    zero, zero_rounds = _simulate(
        tmp_path,
        "prior-0",
        ["training.algorithm=gapsl", "gapsl.gda_lambda=0", "gapsl.prior_tau=0"],
    )
    assert [r["acc_mean"] for r in psl_metrics] == [r["acc_mean"] for r in zero]
    assert [r["loss"] for r in psl_rounds] == [r["loss"] for r in zero_rounds]
    corrected, rounds = _simulate(
        tmp_path, "prior-1", ["training.algorithm=gapsl", "gapsl.gda_lambda=0", "gapsl.prior_tau=1"]
    )
    assert [r["acc_mean"] for r in corrected] != [r["acc_mean"] for r in psl_metrics]
    assert all(r["prior_tau"] == 1.0 for r in rounds)
    # the server's own update is PSL's: its loss on the first round's batches is the same
    assert rounds[0]["loss"] == psl_rounds[0]["loss"]


def test_the_corrected_gradient_is_that_of_the_logit_adjusted_loss() -> None:
    from orchestrator.algorithms.prior import log_priors, prior_corrected_grads

    torch.manual_seed(0)
    server = build_split("digits_mlp", "fc2").server
    gen = torch.Generator().manual_seed(1)
    acts = [torch.randn(6, 32, generator=gen), torch.randn(4, 32, generator=gen)]
    labels = [torch.tensor([0, 0, 1, 0, 2, 0]), torch.tensor([3, 3, 3, 4])]
    priors = log_priors([np.array([0, 0, 0, 1, 2]), np.array([3, 3, 4])], 10)
    assert torch.allclose(priors.exp().sum(dim=1), torch.ones(2, dtype=priors.dtype))
    got = prior_corrected_grads(server, acts, labels, priors, 0.8)
    for i, (a, y) in enumerate(zip(acts, labels)):
        leaf = a.clone().requires_grad_(True)
        z = server(leaf) + 0.8 * priors[i].float()
        (want,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y), leaf)
        torch.testing.assert_close(got[i], want)
    assert all(p.grad is None for p in server.parameters())  # the server's update is not touched


def test_the_prior_correction_outside_the_client_space_names_the_key() -> None:
    with pytest.raises(ManifestError, match=r"\[gapsl\]\.prior_tau"):
        parse_manifest(
            _TEXT, overrides=["training.algorithm=gapsl", "gapsl.space=server", "gapsl.prior_tau=1"]
        )
