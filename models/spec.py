"""``"package.module:name"`` specs: a user's own model factory or data loader, found by import.

The same string travels in the job to every device, which imports the module itself (from its
``PYTHONPATH`` or an installed package), so the orchestrator and the devices call the same code.
Pure standard library: resolving a spec imports only the module it names.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from models.errors import SpecError

# A dotted module path, a colon, a dotted attribute path (a function, or a class's method).
SPEC = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_spec(value: str) -> bool:
    """Whether ``value`` names code (it holds a colon) rather than a built-in name or a path."""
    return ":" in value and "/" not in value and "\\" not in value


def spec_problem(value: str) -> str | None:
    """What is wrong with the form of spec ``value``, or None when it is well formed."""
    if SPEC.fullmatch(value):
        return None
    return f'{value!r} is not of the form "package.module:name"'


def resolve(spec: str) -> Callable[..., Any]:
    """The callable that ``spec`` names; SpecError saying why when it cannot be had."""
    problem = spec_problem(spec)
    if problem:
        raise SpecError(problem)
    module_name, _, attr_path = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a user's module may fail in any way while it imports
        hint = " (is it on PYTHONPATH or installed here?)" if isinstance(exc, ImportError) else ""
        raise SpecError(
            f"{spec}: module {module_name!r} does not import: {type(exc).__name__}: {exc}{hint}"
        ) from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SpecError(
                f"{spec}: module {module_name!r} has no attribute {attr_path!r}"
            ) from None
    if not callable(target):
        raise SpecError(f"{spec}: {attr_path} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[no-any-return]


def call(spec: str, target: Callable[..., Any], *args: Any) -> Any:
    """``target(*args)``; anything it raises becomes one SpecError naming the spec."""
    try:
        return target(*args)
    except Exception as exc:
        shown = ", ".join(repr(a) for a in args)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SpecError(f"{spec}({shown}) raised {type(exc).__name__}: {first}") from exc
