"""The rule registry: every algorithm is reached through it, and a new rule is one class plus one
registry line (the worked example of docs/algorithms.md, "Adding a rule", runs here)."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models import build_split
from orchestrator.algorithms import registry
from orchestrator.algorithms.base import Rule, ServerPart, ServerStepResult, Tensors, psl_backward
from orchestrator.algorithms.dispatch import rule_for
from orchestrator.config.manifest import manifest_to_toml, parse_manifest
from orchestrator.config.sections import TrainingConfig
from orchestrator.engine import Engine

ROOT = Path(__file__).resolve().parents[2]

_TEXT = """
[testbed]
name = "registry"
listen = "127.0.0.1:0"
[training]
dataset = "digits"
rounds = 6
eval_every = 3
lr = 0.5
[data]
partition = "dirichlet"
alpha = 0.1
""" + "".join(f'[[devices]]\nid = "d{i}"\ntoken = "t"\ndevice = "cpu"\n' for i in range(3))


class ClippedPsl(Rule):
    """The worked example: PSL whose server step clips the server gradient's norm."""

    name = "clipped_psl"
    MAX_NORM = 0.05

    def server_step(self, part: ServerPart, acts: Tensors, labels: Tensors) -> ServerStepResult:
        result = psl_backward(part.module, part.optimizer, acts, labels)
        norm = torch.nn.utils.clip_grad_norm_(part.module.parameters(), self.MAX_NORM)
        part.optimizer.step()
        result.diag["server_grad_norm"] = float(norm)
        return result


def test_every_manifest_choice_is_a_registered_rule() -> None:
    choices = dict((f.name, f) for f in dataclasses.fields(TrainingConfig))["algorithm"]
    assert tuple(choices.metadata["choices"]) == registry.RULE_NAMES
    for name in registry.RULE_NAMES:
        m = parse_manifest(_TEXT, overrides=[f"training.algorithm={name}"])
        rule = rule_for(m)
        assert isinstance(rule, Rule) and rule.name == name


def _algorithm_names_compared(path: Path) -> list[str]:
    """Places in a module that compare something with a registered rule's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            for c in [node.left, *node.comparators]:
                if isinstance(c, ast.Constant) and c.value in registry.RULE_NAMES:
                    found.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} compares with {c.value!r}"
                    )
    return found


def test_no_module_tests_an_algorithm_name() -> None:
    """The loop and the engines dispatch through rules: no `algorithm == "sfl"` anywhere."""
    offenders = [
        hit
        for path in sorted((ROOT / "orchestrator").rglob("*.py"))
        for hit in _algorithm_names_compared(path)
    ]
    assert offenders == []


def test_the_name_check_finds_a_comparison(tmp_path: Path) -> None:
    bad = ROOT / "orchestrator" / "_registry_probe_tmp.py"
    try:
        bad.write_text('def f(m):\n    return m.training.algorithm == "sfl"\n')
        assert _algorithm_names_compared(bad) == [
            "orchestrator/_registry_probe_tmp.py:2 compares with 'sfl'"
        ]
    finally:
        bad.unlink()


def test_the_example_rule_clips_the_server_gradient() -> None:
    torch.manual_seed(0)
    split = build_split("digits_mlp", "fc1", num_classes=10)
    opt = torch.optim.SGD(split.server.parameters(), lr=0.1)
    acts = [split.client(torch.randn(8, 64)) for _ in range(2)]
    labels = [torch.randint(0, 10, (8,)) for _ in range(2)]
    rule = ClippedPsl(parse_manifest(_TEXT))
    result = rule.server_step(ServerPart(split.server, opt), acts, labels)
    total = torch.cat([p.grad.reshape(-1) for p in split.server.parameters()]).norm()
    assert float(total) <= ClippedPsl.MAX_NORM * (1 + 1e-5)
    assert result.diag["server_grad_norm"] > ClippedPsl.MAX_NORM  # it did have to clip


def _simulate(tmp_path: Path, algorithm: str) -> list[dict[str, float]]:
    m = parse_manifest(_TEXT)
    # the manifest's choices are the registry's at import; a rule added at run time is set here
    m = dataclasses.replace(m, training=dataclasses.replace(m.training, algorithm=algorithm))
    out = tmp_path / algorithm
    engine = Engine(m, out, manifest_to_toml(m), run_id=out.name, in_process=True)
    assert asyncio.run(engine.run()) == "completed"
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_rule_added_with_one_registry_line_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.RULES, "clipped_psl", f"{__name__}:ClippedPsl")
    clipped = _simulate(tmp_path, "clipped_psl")
    plain = _simulate(tmp_path, "psl")
    assert [r["round"] for r in clipped] == [3, 6]
    assert [r["acc_mean"] for r in clipped] != [r["acc_mean"] for r in plain]
    rounds = [
        json.loads(x) for x in (tmp_path / "clipped_psl" / "rounds.jsonl").read_text().splitlines()
    ]
    assert all(r["server_grad_norm"] > 0 for r in rounds)  # the rule's diagnostics are recorded
