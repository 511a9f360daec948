"""``gapsl.leader = "update"``: LGI and GDA act on the devices' momentum steps.

Each device uploads the step its SGD would take (momentum applied to the raw gradient), is moved
along the aligned step, and keeps its own unaligned step as its momentum; lam = 0 is PSL bit for
bit, parameters and momentum buffers.
"""

from __future__ import annotations

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
from orchestrator.config.manifest import ManifestError, parse_manifest

from .test_algorithms import _client_job, _same_params, _sgd


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


@pytest.mark.parametrize("mode", ["first_order", "pull"])
def test_lambda_zero_with_update_leaders_is_psl_bit_for_bit(digits: Any, mode: str) -> None:
    torch.manual_seed(7)
    split = build_split("digits_cnn")
    weights = state_to_numpy(split.client)
    server, opt = split.server, _sgd(split.server)
    shard = np.flatnonzero(digits.y_train < 4)
    common = (shard, weights, digits.x_train, digits.y_train, digits.normalize, "cpu")
    psl = ClientTrainer(_client_job(""), *common)
    held = ClientTrainer({**_client_job(mode), "gapsl_leader": "update"}, *common)
    for r in range(1, 5):
        acts, y, _ = psl.forward(r, 16)
        held.forward(r, 16)
        step = psl_server_step(server, opt, [torch.from_numpy(acts)], [torch.from_numpy(y)])
        grad = step.grads[0].numpy()
        psl.backward(r, grad, hold=False)
        update, _ = held.backward(r, grad, hold=True)
        assert update is not None
        held.align(r, -update, mode, 0.0)  # any leader: lam = 0 ignores it
        assert _same_params(psl.model, held.model), f"client weights differ after round {r}"
        for p, q in zip(psl.model.parameters(), held.model.parameters()):
            assert torch.equal(
                psl.optimizer.state[p]["momentum_buffer"],
                held.optimizer.state[q]["momentum_buffer"],
            )


def test_an_update_leader_uploads_the_momentum_step_and_keeps_its_own_momentum(
    digits: Any,
) -> None:
    torch.manual_seed(7)
    split = build_split("digits_cnn")
    weights = state_to_numpy(split.client)
    server, opt = split.server, _sgd(split.server)
    shard = np.flatnonzero(digits.y_train < 4)
    job = {**_client_job("first_order"), "gapsl_leader": "update", "weight_decay": 0.0}
    t = ClientTrainer(job, shard, weights, digits.x_train, digits.y_train, digits.normalize, "cpu")
    grads = []
    leader = None
    for r in range(1, 4):
        acts, y, _ = t.forward(r, 16)
        step = psl_server_step(server, opt, [torch.from_numpy(acts)], [torch.from_numpy(y)])
        before = [p.detach().clone() for p in t._params]
        update, _ = t.backward(r, step.grads[0].numpy(), hold=True)
        assert update is not None
        grads.append(flat_grad(t._params).clone())
        # the upload is the momentum sum of the raw gradients: g_r + 0.9 g_{r-1} + 0.81 g_{r-2}
        expected = sum(0.9 ** (len(grads) - 1 - k) * g for k, g in enumerate(grads))
        torch.testing.assert_close(torch.from_numpy(update), expected, rtol=1e-5, atol=1e-7)
        leader = torch.randn(update.shape, generator=torch.Generator().manual_seed(r))
        t.align(r, leader.numpy(), "first_order", 1.0)
        moved = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, t._params)])
        # the step went along the leader with the length of the device's own update
        assert float(cosine(moved, leader)) > 0.999
        assert t.aligned is not None and t.aligned[0] == r and t.aligned[1] > 0.999  # reported
        assert float(moved.norm()) == pytest.approx(0.05 * float(np.linalg.norm(update)), rel=1e-4)


_MANIFEST = '[training]\ndataset = "digits"\n[[devices]]\nid = "a"\ntoken = "t"\n'


def test_update_leaders_need_the_client_space_and_a_blend() -> None:
    base = "training.algorithm=gapsl"
    assert (
        parse_manifest(_MANIFEST, overrides=[base, "gapsl.leader=update"]).gapsl.leader == "update"
    )
    with pytest.raises(ManifestError, match=r"\[gapsl\]\.leader"):
        parse_manifest(_MANIFEST, overrides=[base, "gapsl.leader=update", "gapsl.space=server"])
    with pytest.raises(ManifestError, match=r"\[gapsl\]\.leader"):
        parse_manifest(_MANIFEST, overrides=[base, "gapsl.leader=update", "gapsl.gda_mode=exact"])
