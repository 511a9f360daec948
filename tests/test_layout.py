"""The layout holds: no import cycles, imports point the way the layers do, modules stay small,
and the exception tree in ``orchestrator/errors.py`` names every exception class there is.

The import graph is read from the source with ``ast`` (nothing is imported): every ``import``
and ``from ... import`` anywhere in a module — at module level, inside functions, and under
``if TYPE_CHECKING:`` too, since a type-only import is still a dependency of the design, and
tolerating it would hide exactly the cycles that such guards are written to dodge. A package's
``__init__.py`` is the module named by the package. The checker functions are plain functions
over a graph, so the tests at the end can show that each check fails when it should.
"""

from __future__ import annotations

import argparse
import ast
import builtins
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "edge_agent", "orchestrator")  # the import graph's modules
SIZED = (*PACKAGES, "bench", "tests", "scripts")  # folders whose .py files the size check reads
MAX_LINES = 400  # STYLE.md: "modules over ~400 lines" are to avoid

# (importer, what it must not import): a module is matched with its submodules.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("models", ("edge_agent", "orchestrator")),
    ("edge_agent", ("orchestrator",)),
    ("orchestrator.ui", ("orchestrator.fleet",)),
    (
        "orchestrator.algorithms",
        (
            "orchestrator.fleet",
            "orchestrator.ui",
            "orchestrator.records",
            "orchestrator.engine",
            "orchestrator.cli",
        ),
    ),
    # The vocabulary and the exception root are imported by every layer, so they import none.
    ("orchestrator.names", PACKAGES),
    ("orchestrator.errors", PACKAGES),
)

Graph = Mapping[str, Mapping[str, int]]  # module -> {imported module: first line importing it}


# --- the checkers ----------------------------------------------------------------------------


def module_of(path: Path, root: Path = ROOT) -> str:
    """``orchestrator/fleet/sessions.py`` -> ``orchestrator.fleet.sessions``; a package's
    ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> dict[str, int]:
    """The modules of ``known`` that ``source`` (the text of ``module``) imports, each with the
    first line that does.

    Relative imports are resolved against the module's package. ``from pkg import name`` counts
    as an import of ``pkg.name`` when that is a module, else of ``pkg``; any other name resolves
    to its longest prefix in ``known`` (nothing, for a module outside the project).
    """
    package = module if is_package else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.setdefault(name, line)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                add(sub if sub in known else base, node.lineno)
    return found


def import_graph(
    root: Path = ROOT, packages: Iterable[str] = PACKAGES
) -> dict[str, dict[str, int]]:
    """The import graph of every module under ``packages`` (paths relative to ``root``)."""
    files = {module_of(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    known = set(files)
    return {
        name: imports_of(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        for name, path in files.items()
    }


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def describe_cycle(graph: Graph, component: list[str]) -> str:
    """A component as the imports that tie it together, one ``a -> b (line n)`` per edge."""
    members = set(component)
    edges = [
        f"  {a} -> {b} (line {line})"
        for a in component
        for b, line in sorted(graph.get(a, {}).items())
        if b in members
    ]
    return "cycle among " + ", ".join(component) + ":\n" + "\n".join(edges)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layering_violations(
    graph: Graph, layers: Iterable[tuple[str, Iterable[str]]] = LAYERS
) -> list[str]:
    """Every import against ``layers``, as ``importer -> imported (line n): importer must not
    import forbidden``."""
    out = []
    for importer, forbidden in layers:
        for module in sorted(m for m in graph if _within(m, importer)):
            for target, line in sorted(graph[module].items()):
                for banned in forbidden:
                    if _within(target, banned):
                        out.append(
                            f"{module} -> {target} (line {line}): {importer} must not import "
                            f"{banned}"
                        )
    return out


def oversized(
    root: Path = ROOT, folders: Iterable[str] = SIZED, limit: int = MAX_LINES
) -> list[str]:
    """Every ``.py`` file under ``folders`` longer than ``limit`` lines, as ``path: n lines``."""
    out = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if ".venv" in path.parts:
                continue
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > limit:
                out.append(f"{path.relative_to(root)}: {n} lines")
    return out


def exception_classes(root: Path = ROOT, package: str = "orchestrator") -> dict[str, str]:
    """Every class under ``package`` that derives from an exception, by name -> module."""
    bases: dict[str, tuple[str, list[str]]] = {}
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names = [ast.unparse(b).rpartition(".")[2] for b in node.bases]
                bases[node.name] = (module_of(path, root), names)

    def is_exception(name: str, seen: frozenset[str] = frozenset()) -> bool:
        builtin = getattr(builtins, name, None)
        if isinstance(builtin, type) and issubclass(builtin, BaseException):
            return True
        if name not in bases or name in seen:
            return False
        return any(is_exception(b, seen | {name}) for b in bases[name][1])

    return {name: bases[name][0] for name in bases if is_exception(name)}


# --- the real tree ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph()


def test_no_import_cycles(graph: dict[str, dict[str, int]]) -> None:
    found = cycles(graph)
    assert not found, "\n".join(describe_cycle(graph, c) for c in found)


def test_imports_follow_the_layers(graph: dict[str, dict[str, int]]) -> None:
    assert not (bad := layering_violations(graph)), "\n".join(bad)


def test_no_module_over_the_size_limit() -> None:
    assert not (big := oversized()), f"over {MAX_LINES} lines:\n" + "\n".join(big)


def test_the_exception_tree_names_every_orchestrator_exception() -> None:
    tree = ast.get_docstring(ast.parse((ROOT / "orchestrator" / "errors.py").read_text()))
    missing = {n: m for n, m in exception_classes().items() if n not in (tree or "")}
    assert not missing, f"not in orchestrator/errors.py's tree: {missing}"


def test_every_command_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import _parser
    from orchestrator.errors import exit_code_help

    parser = _parser()
    (commands,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for argv in ([], *([name] for name in commands)):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--help"])
        assert exit_code_help() in capsys.readouterr().out, argv


# --- the checkers catch what they should -----------------------------------------------------


def test_a_cycle_is_found_and_shown_with_its_imports() -> None:
    g = {"a": {"b": 3}, "b": {"c": 4}, "c": {"a": 5, "d": 1}, "d": {}, "e": {"d": 2}}
    assert cycles(g) == [["a", "b", "c"]]
    assert "c -> a (line 5)" in describe_cycle(g, ["a", "b", "c"])
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_a_layering_violation_is_found_and_a_neighbour_is_not_mistaken() -> None:
    g = {
        "orchestrator.ui.render": {"orchestrator.fleet.sessions": 7, "orchestrator.config": 3},
        "orchestrator.uikit": {"orchestrator.fleet": 1},  # not orchestrator.ui
        "edge_agent.agent": {"orchestrator": 9},
        "models.registry": {"edge_agent.protocol": 2},
    }
    assert layering_violations(g) == [
        "models.registry -> edge_agent.protocol (line 2): models must not import edge_agent",
        "edge_agent.agent -> orchestrator (line 9): edge_agent must not import orchestrator",
        "orchestrator.ui.render -> orchestrator.fleet.sessions (line 7): orchestrator.ui must "
        "not import orchestrator.fleet",
    ]


def test_imports_are_resolved_relative_nested_and_from_forms() -> None:
    known = {"pkg", "pkg.sub", "pkg.sub.mod", "pkg.sub.sibling", "pkg.other", "pkg.x"}
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"  # a module of the package
        "from .. import other\n"
        "from ..x import thing\n"  # a name in pkg.x
        "if TYPE_CHECKING:\n"
        "    from pkg import helper\n"  # not a module: an import of pkg
        "def f():\n"
        "    import pkg.sub\n"
        "    import numpy\n"  # outside the project
    )
    assert imports_of(source, "pkg.sub.mod", False, known) == {
        "pkg.sub.sibling": 3,
        "pkg.other": 4,
        "pkg.x": 5,
        "pkg": 7,
        "pkg.sub": 9,
    }
    # In a package's __init__, "." is the package itself.
    assert imports_of("from .mod import y\n", "pkg.sub", True, known) == {"pkg.sub.mod": 1}


def test_a_long_module_is_found(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "src" / "short.py").write_text("x = 1\n" * MAX_LINES)
    assert oversized(tmp_path, ["src"]) == [f"src/long.py: {MAX_LINES + 1} lines"]


def test_exception_classes_follow_bases_across_modules(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.py").write_text("class Root(Exception): ...\nclass Plain: ...\n")
    (tmp_path / "p" / "b.py").write_text("from p import a\nclass Leaf(a.Root): ...\n")
    assert exception_classes(tmp_path, "p") == {"Root": "p.a", "Leaf": "p.b"}
