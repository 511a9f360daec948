"""From a rule's name to the rule: the only way the round loop and the engines reach one."""

from __future__ import annotations

import importlib

from orchestrator.algorithms.base import Rule
from orchestrator.algorithms.registry import RULES
from orchestrator.config.manifest import Manifest


def rule_class(name: str) -> type[Rule]:
    """The class registered as ``name`` (a ``KeyError`` for an unknown one: the manifest loader
    has refused it already)."""
    module, _, cls = RULES[name].partition(":")
    found: type[Rule] = getattr(importlib.import_module(module), cls)
    return found


def rule_for(m: Manifest) -> Rule:
    """A fresh rule for the manifest's ``training.algorithm``, holding its own state."""
    return rule_class(m.training.algorithm)(m)
