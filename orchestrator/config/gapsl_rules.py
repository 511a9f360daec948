"""The ``[gapsl]`` section's defaults and the rules across its keys.

The defaults belong to the client space with gradient leaders, where the accuracy study measured
them (docs/results.md); where a manifest chooses another space or update leaders, the keys it
leaves unset take the defaults that apply there: first-order GDA and no prior correction. Then
the combinations that cannot work are refused, naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from orchestrator.config.sections import GapslConfig
from orchestrator.config.values import toml_value

_ELSEWHERE: dict[str, Any] = {"gda_mode": "first_order", "prior_tau": 0.0}


def resolve_gapsl(
    g: GapslConfig, given: Any, error: Callable[[str, str], Exception]
) -> GapslConfig:
    """``g`` with the defaults of its space filled in; ``given`` is the manifest's own
    ``[gapsl]`` table (what the user set), ``error(key, why)`` makes the one-line error."""
    if not (g.space == "client" and g.leader == "gradient"):
        set_ = given if isinstance(given, dict) else {}
        g = replace(g, **{k: v for k, v in _ELSEWHERE.items() if k not in set_})
    if g.leader == "update" and (g.space != "client" or g.gda_mode == "exact"):
        raise error(
            "gapsl.leader",
            '"update" needs gapsl.space = "client" and gda_mode first_order or pull, got '
            f"space {toml_value(g.space)} and gda_mode {toml_value(g.gda_mode)}",
        )
    if g.gda_mode in ("tracking", "anchor") and (g.space != "client" or g.leader != "gradient"):
        raise error(
            "gapsl.gda_mode",
            f"{toml_value(g.gda_mode)} acts on each device's own client partition: it needs "
            f'gapsl.space = "client" and leader "gradient", got space {toml_value(g.space)} and '
            f"leader {toml_value(g.leader)}",
        )
    if g.prior_tau > 0 and g.space != "client":
        raise error(
            "gapsl.prior_tau",
            f'the prior correction needs gapsl.space = "client", got {toml_value(g.space)}',
        )
    return g
