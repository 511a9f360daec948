"""``scheduler.top_up = "replay"``: small batches topped up at the server from the device's own
recent samples; the device gets back the gradient it would have got without it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import torch
from torch import nn

from bench.balance_sim import emulated_profiles
from bench.scheduling import FLEET, manifest
from orchestrator.algorithms.base import psl_backward
from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.engine import Engine
from orchestrator.records import checkpoint
from orchestrator.training.replay import Replay


def _batch(n: int, start: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.arange(start, start + n).reshape(n, 1).repeat(1, 3)
    return a, torch.arange(n) % 2


def test_top_up_fills_small_batches_from_the_devices_own_recent_samples(tmp_path: Path) -> None:
    replay = Replay(batch_size=4)
    (a1, y1), (b1, z1) = _batch(4, 0.0), _batch(2, 100.0)
    acts, labels, fresh = replay.top_up(["a", "b"], [a1, b1], [y1, z1])
    assert fresh == {} and [len(x) for x in acts] == [4, 2]  # nothing held yet
    (a2, y2), (b2, z2) = _batch(4, 10.0), _batch(2, 200.0)
    acts, labels, fresh = replay.top_up(["a", "b"], [a2, b2], [y2, z2])
    assert fresh == {"b": 2}
    assert torch.equal(acts[0], a2)  # a device at the batch size is untouched
    assert torch.equal(acts[1], torch.cat([b2, b1]))  # its own rows first, then its last ones
    assert torch.equal(labels[1], torch.cat([z2, z1]))
    b3, z3 = _batch(1, 300.0)
    acts, labels, fresh = replay.top_up(["b"], [b3], [z3])
    # its own row, then the three most recent it sent before (round 1's last, round 2's two)
    assert fresh == {"b": 1} and acts[0][:, 0].tolist() == [300.0, 101.0, 200.0, 201.0]
    # what a resumed run replays: the buffer goes through the checkpoint file and back
    checkpoint.save(tmp_path, {"round": 3, "replay": replay.state_dict()})
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None
    again = Replay(batch_size=4)
    again.load_state_dict(loaded["replay"], torch.device("cpu"))
    assert again.held.keys() == replay.held.keys()
    for i in replay.held:
        assert all(torch.equal(x, y) for x, y in zip(again.held[i], replay.held[i]))


def test_devices_get_the_gradient_they_would_without_replay() -> None:
    """What travels is unchanged: a device's activation gradient depends only on its own rows
    and the server's weights, so the fresh rows' share, rescaled as the loop does, is the
    gradient of its fresh mean loss. Only the server's own gradient (its update) differs."""
    torch.manual_seed(0)
    server = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(server.parameters(), lr=0.1)
    fast, small = torch.randn(4, 3), torch.randn(2, 3)
    y_fast, y_small = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0])
    old, y_old = torch.randn(2, 3), torch.tensor([0, 0])
    plain = psl_backward(server, opt, [fast, small], [y_fast, y_small])
    plain_server = [p.grad.clone() for p in server.parameters() if p.grad is not None]
    padded = psl_backward(
        server, opt, [fast, torch.cat([small, old])], [y_fast, torch.cat([y_small, y_old])]
    )
    sent = padded.grads[1][:2] * (4 / 2)
    assert torch.allclose(sent, plain.grads[1], atol=1e-6)
    assert torch.allclose(padded.grads[0], plain.grads[0], atol=1e-6)
    topped = [p.grad for p in server.parameters() if p.grad is not None]
    assert any(not torch.allclose(x, y) for x, y in zip(topped, plain_server))


def test_a_balanced_run_with_replay(tmp_path: Path) -> None:
    """In-process, with the bench's emulated figures as profiles: the slow devices are planned
    at the floor, the run completes, and replay changes what the server learns."""
    text = manifest(rounds=6, fleet=FLEET[:3])
    sets = ["scheduler.policy=latency_balanced", "training.eval_every=6"]
    out = {}
    with emulated_profiles(FLEET[:3]):
        for top_up in ("none", "replay"):
            m = parse_manifest(text, overrides=[*sets, f"scheduler.top_up={top_up}"])
            d = tmp_path / top_up
            engine = Engine(m, d, manifest_to_toml(m), run_id=top_up, in_process=True)
            assert asyncio.run(engine.run()) == "completed"
            rounds = [json.loads(x) for x in (d / "rounds.jsonl").read_text().splitlines()]
            out[top_up] = rounds
    batches = out["replay"][-1]["devices"]
    assert min(v["batch"] for v in batches.values()) == 8  # the floor, a quarter of 32
    assert [r["round"] for r in out["replay"]] == list(range(1, 7))
    # round 1 holds nothing to replay, so it is the same; later server steps are not
    assert out["replay"][0]["loss"] == out["none"][0]["loss"]
    assert out["replay"][-1]["loss"] != out["none"][-1]["loss"]
