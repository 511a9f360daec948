"""``pip install <checkout>`` with no extras gives a working ``gapsl-orchestrator``: every import
of the packages is a core dependency of pyproject.toml, or an optional one that is imported only
where it is used and, when missing, named in one line with the extra that installs it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "edge_agent", "models")
# import name -> (distribution, the extra that installs it); anything else must be core
OPTIONAL = {
    "matplotlib": ("matplotlib", "report"),
    "cryptography": ("cryptography", "tls"),
    "prometheus_client": ("prometheus-client", "metrics"),
    "ray": ("ray", "ray"),
}
DIST = {
    "sklearn": "scikit-learn",
    "prometheus_client": "prometheus-client",
}  # import names that are not their distribution's name


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def _third_party_imports() -> dict[str, dict[str, bool]]:
    """import name -> {module file: whether some import of it runs at module import time}."""
    found: dict[str, dict[str, bool]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            eager = {id(n) for n in _module_level(tree.body)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in (*PACKAGES, "__future__"):
                        continue
                    where = found.setdefault(top, {})
                    rel = str(path.relative_to(ROOT))
                    where[rel] = where.get(rel, False) or id(node) in eager
    return found


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run when the module is imported (not under TYPE_CHECKING)."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" not in test:
                out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body)
        else:
            out.append(node)
    return out


def test_every_import_is_a_core_dependency_or_a_lazy_optional_one() -> None:
    project = _project()
    core = _names(project["dependencies"])
    extras = {k: _names(v) for k, v in project["optional-dependencies"].items()}
    imports = _third_party_imports()
    assert {"torch", "rich", "websockets"} <= set(imports)  # the scan sees real imports
    for name, where in imports.items():
        if name in OPTIONAL:
            dist, extra = OPTIONAL[name]
            assert dist in extras[extra], f"{dist} is not in the [{extra}] extra"
            eager = [f for f, at_import in where.items() if at_import]
            assert not eager, f"optional {name} imported at module level in {eager}"
        else:
            assert DIST.get(name, name) in core, (
                f"{name} ({sorted(where)}) is not a core dependency"
            )
    assert "rich" in core and not any(r.startswith("torch=") for r in project["dependencies"])


# Runs the CLI with some packages made unimportable, as on a machine without them.
HIDE = textwrap.dedent(
    """
    import importlib.abc, sys
    hidden = set(sys.argv[1].split(","))

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in hidden:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Hide())
    from orchestrator.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def _without(hidden: str, *argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", HIDE, hidden, *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("hidden", "argv", "says"),
    [
        ("cryptography", ["tls-init", "{tmp}/tls", "--host", "lab"], "'gapsl-testbed[tls]'"),
        ("sklearn", ["check", str(ROOT / "testbed.toml")], "pip install scikit-learn"),
        (
            "prometheus_client",
            ["check", str(ROOT / "testbed.toml"), "--set", "testbed.metrics_listen=127.0.0.1:0"],
            "'gapsl-testbed[metrics]'",
        ),
    ],
    ids=[
        "tls-init without cryptography",
        "digits without scikit-learn",
        "metrics without prometheus-client",
    ],
)
def test_a_missing_optional_package_is_one_line_naming_its_extra(
    hidden: str, argv: list[str], says: str, tmp_path: Path
) -> None:
    done = _without(hidden, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert not (tmp_path / "tls").exists()  # nothing half-made


TINY = """
[training]
rounds = 2
eval_every = 1
[[devices]]
id = "a"
token = "ta"
launch = "local"
"""


def test_simulate_watch_and_report_work_without_matplotlib_and_cryptography(
    tmp_path: Path,
) -> None:
    (tmp_path / "m.toml").write_text(TINY)
    hidden = "matplotlib,cryptography"
    run = tmp_path / "run"
    done = _without(hidden, "simulate", "m.toml", "--run-dir", str(run), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    watched = _without(hidden, "watch", str(run), "--once", "--width", "100", cwd=tmp_path)
    assert watched.returncode == 0 and "COMPLETED" in watched.stdout, watched.stderr
    report = _without(hidden, "report", str(run), cwd=tmp_path)
    assert report.returncode == 0 and (run / "report" / "summary.md").is_file()
    assert "gapsl-testbed[report]" in report.stderr  # says how to get the plots


def test_the_readme_never_says_a_bare_pip_install_torch() -> None:
    # On x86 Linux a bare `pip install torch` pulls a multi-gigabyte CUDA build, GPU or not.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.findall(r"pip install [^\n`|]*torch\b[^\n`|]*", readme)
    assert commands, "the README gives no torch install command"
    for command in commands:
        assert "--index-url" in command, command
    for platform in ("Raspberry Pi", "Jetson", "CPU only", "NVIDIA GPU"):
        assert platform in readme
