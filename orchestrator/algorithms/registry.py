"""The registry of training rules: the one place that names them.

``training.algorithm`` picks an entry; the round loop and the engines reach a rule only through
:func:`orchestrator.algorithms.dispatch.rule_for`. Entries are ``module:Class`` and this module
imports nothing, so that the manifest loader (which checks the name against :data:`RULE_NAMES`)
sits below the rules without importing them or torch. Adding a rule: one module with a
:class:`~orchestrator.algorithms.base.Rule` subclass, and one line here (docs/algorithms.md,
"Adding a rule").
"""

from __future__ import annotations

RULES: dict[str, str] = {
    "psl": "orchestrator.algorithms.psl:Psl",
    "gapsl": "orchestrator.algorithms.gapsl:Gapsl",
    "sfl": "orchestrator.algorithms.sfl:Sfl",
    "epsl": "orchestrator.algorithms.epsl:Epsl",
    "central": "orchestrator.algorithms.central:Central",
}
RULE_NAMES = tuple(RULES)
