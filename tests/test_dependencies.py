"""Every third-party module memenc imports is a dependency pyproject.toml declares: a
module-level import a runtime dependency, an import inside a function (used only on some
paths) a runtime dependency or one of an extra. The test suite's own environment holds
more than memenc declares (dask pulls in click, for one), so only this check, and the
runtime-only environment `.ci/run` builds, catch an undeclared import."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _names(requirements: list[str]) -> set[str]:
    """Normalised distribution names of requirement strings (`torch>=2.5` -> `torch`)."""
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module, imported at module level?, line) for each absolute import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], top, child.lineno))
            visit(child, inner)

    visit(tree, True)
    return found


def undeclared_imports(package: Path, pyproject: Path) -> tuple[list[str], set[str]]:
    """(problems, third-party modules seen) for the .py files under `package`."""
    project = tomllib.loads(pyproject.read_text())["project"]
    runtime = _names(project["dependencies"])
    extras = set().union(*(_names(r) for r in project.get("optional-dependencies", {}).values()))
    distributions = packages_distributions()
    problems = []
    seen = set()
    for path in sorted(package.rglob("*.py")):
        for module, top, line in _imports(path):
            if module in sys.stdlib_module_names or module in ("memenc", "__future__"):
                continue
            seen.add(module)
            dists = {_normalise(d) for d in distributions.get(module, [])}
            where = f"{path.relative_to(package.parent)}:{line} imports {module}"
            if not dists:
                problems.append(f"{where}, which no installed distribution provides")
            elif not dists & runtime and (top or not dists & extras):
                kind = "runtime dependency" if top else "dependency or extra"
                problems.append(f"{where} ({', '.join(sorted(dists))}): not a declared {kind}")
    return problems, seen


def test_every_imported_module_is_a_declared_dependency():
    problems, seen = undeclared_imports(ROOT / "memenc", ROOT / "pyproject.toml")
    assert not problems, "\n".join(problems)
    # the check saw the imports it is about (a broken walk would pass vacuously)
    assert {"torch", "numpy", "typer", "zarr", "decord", "av", "PIL", "fsspec"} <= seen


def test_the_check_catches_undeclared_imports(tmp_path):
    """click is installed here (through dask), yet `import click` is reported; a test-extra
    module is fine inside a function but not at module level."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text(
        "import click\nimport numpy\nimport xarray\n\ndef f():\n    import dask\n"
    )
    problems, seen = undeclared_imports(package, ROOT / "pyproject.toml")
    assert seen == {"click", "numpy", "xarray", "dask"}
    assert len(problems) == 2, problems
    assert "m.py:1 imports click" in problems[0] and "not a declared runtime" in problems[0]
    assert "m.py:3 imports xarray" in problems[1]
