"""The registry of training rules: the one place that names them.

``training.algorithm`` picks an entry; the round loop and the engines reach a rule only through
:func:`rule_for`. Entries are ``module:Class`` so that reading a manifest (which checks the name
against :data:`RULE_NAMES`) does not import torch. Adding a rule: one module with a
:class:`~orchestrator.algorithms.base.Rule` subclass, and one line here (docs/algorithms.md,
"Adding a rule").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.algorithms.base import Rule
    from orchestrator.config.manifest import Manifest

RULES: dict[str, str] = {
    "psl": "orchestrator.algorithms.psl:Psl",
    "gapsl": "orchestrator.algorithms.gapsl:Gapsl",
    "sfl": "orchestrator.algorithms.sfl:Sfl",
    "epsl": "orchestrator.algorithms.epsl:Epsl",
    "central": "orchestrator.algorithms.central:Central",
}
RULE_NAMES = tuple(RULES)


def rule_class(name: str) -> type[Rule]:
    """The class registered as ``name`` (a ``KeyError`` for an unknown one: the manifest loader
    has refused it already)."""
    module, _, cls = RULES[name].partition(":")
    found: type[Rule] = getattr(importlib.import_module(module), cls)
    return found


def rule_for(m: Manifest) -> Rule:
    """A fresh rule for the manifest's ``training.algorithm``, holding its own state."""
    return rule_class(m.training.algorithm)(m)
