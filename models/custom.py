"""Models of the user's own: ``training.model = "package.module:factory"``.

The factory is called as ``factory(num_classes)`` and returns the model as its ordered, named
stages, as the zoo's builders do: a list of ``(name, nn.Module)`` pairs, or an ``nn.Sequential``
whose named children are the stages. Every stage but the last is a cut point unless the factory
carries a ``cuts`` attribute (the stage names allowed); the default cut is the first of them
unless it carries ``default_cut``. All stages are built in the one call, in order, so under the
same seed every cut of the model gets the same weights (as the zoo's do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from models.base import ModelInfo, Stage
from models.errors import SpecError
from models.spec import call, resolve


def _stage_list(spec: str, built: Any) -> list[Stage]:
    if isinstance(built, nn.Sequential):
        built = list(built.named_children())
    wrong = f"{spec} must return a list of (name, nn.Module) stages, got"
    if not isinstance(built, Sequence) or isinstance(built, (str, bytes)):
        raise SpecError(f"{wrong} {type(built).__name__}")
    stages: list[Stage] = []
    for item in built:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise SpecError(f"{wrong} an item {type(item).__name__}")
        name, module = item
        if not isinstance(name, str) or not name or "." in name:
            raise SpecError(f"{spec}: stage name {name!r} must be a non-empty str without dots")
        if not isinstance(module, nn.Module):
            raise SpecError(f"{spec}: stage {name!r} is a {type(module).__name__}, not nn.Module")
        stages.append((name, module))
    names = [n for n, _ in stages]
    if len(stages) < 2:
        raise SpecError(f"{spec} must return at least two stages (one each side of a cut)")
    if len(set(names)) != len(names):
        raise SpecError(f"{spec}: stage names must differ, got {', '.join(names)}")
    return stages


def _cuts(spec: str, factory: Any, names: list[str]) -> tuple[tuple[str, ...], str]:
    cuts = tuple(getattr(factory, "cuts", names[:-1]))
    bad = [c for c in cuts if c not in names[:-1]]
    if not cuts or bad:
        raise SpecError(
            f"{spec}.cuts must name stages other than the last ({', '.join(names[:-1])}), "
            f"got {', '.join(map(repr, cuts)) or 'none'}"
        )
    default = getattr(factory, "default_cut", cuts[0])
    if default not in cuts:
        raise SpecError(f"{spec}.default_cut {default!r} is not one of its cuts")
    return cuts, default


def factory_stages(spec: str, num_classes: int) -> tuple[ModelInfo, list[Stage]]:
    """Import the factory ``spec`` names, call it, and check what it returned.

    SpecError (one line naming the spec) when it does not import, resolve, run or return
    stages; the cut is checked by the caller against ``info.cuts``.
    """
    factory = resolve(spec)
    stages = _stage_list(spec, call(spec, factory, num_classes))
    cuts, default = _cuts(spec, factory, [n for n, _ in stages])
    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
    info = ModelInfo(
        name=spec,
        input_shape=(),  # not declared: the preflight runs the model on the data instead
        cuts=cuts,
        default_cut=default,
        description=doc[0] if doc else f"the stages of {spec}",
    )
    return info, stages
