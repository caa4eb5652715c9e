"""The package layout's two rules (issue 10), checked with `ast` over memenc/.

- No module imports an underscore name of a module in another package, neither as
  ``from memenc.x import _y`` nor as ``memenc.x._y`` / ``alias._y`` through an imported
  module. A package is a directory: memenc/, memenc/store/, memenc/pipeline/,
  memenc/pipeline/video/, memenc/cli/, memenc/encoders/ …
- No module of memenc/store/ or memenc/pipeline/video/ is over 500 lines.

The checker runs on the real tree, and on a small synthetic tree with one violation of
each kind, to show it reports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 500
SIZE_LIMITED = ("store", "pipeline/video")


def _module_file(root: Path, dotted: str) -> Path | None:
    """The file of module `dotted` (``memenc.a.b``) under `root` (the folder holding
    memenc/), or None when it is not a memenc module."""
    parts = dotted.split(".")
    if parts[0] != "memenc":
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _absolute(root: Path, file: Path, node: ast.ImportFrom) -> str:
    """The absolute module of a ``from … import``, relative ones resolved."""
    if node.level == 0:
        return node.module or ""
    package = _module_name(root, file).split(".")
    if file.name != "__init__.py":
        package.pop()
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything but names and attributes."""
    names: list[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(names)]


def cross_package_private_imports(root: Path) -> list[str]:
    """``"memenc/b/user.py:3 imports _name from memenc.a.mod"`` for each use of another
    package's underscore name by a module under ``root/memenc``."""
    found: list[str] = []
    for file in sorted((root / "memenc").rglob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        uses: list[tuple[int, str, str, Path]] = []  # (line, name, module, its file)
        bound: dict[str, str] = {}  # local name -> the memenc module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _module_file(root, alias.name) is None:
                        continue
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound.setdefault("memenc", "memenc")
            elif isinstance(node, ast.ImportFrom):
                module = _absolute(root, file, node)
                target = _module_file(root, module)
                if target is None:
                    continue
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    if _module_file(root, submodule) is not None:
                        bound[alias.asname or alias.name] = submodule
                    if _private(alias.name):
                        uses.append((node.lineno, alias.name, module, target))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            chain = _dotted(node.value)
            if not chain or chain[0] not in bound:
                continue
            module = ".".join([bound[chain[0]], *chain[1:]])
            target = _module_file(root, module)
            if target is not None:
                uses.append((node.lineno, node.attr, module, target))
        where = file.relative_to(root).as_posix()
        for line, name, module, target in uses:
            if target.parent != file.parent:  # another package (directory)
                found.append(f"{where}:{line} imports {name} from {module}")
    return sorted(set(found))


def oversized_modules(root: Path) -> list[str]:
    """``"memenc/store/x.py: 501 lines"`` for each module of the size-limited packages
    over `MAX_LINES` (packages that do not exist yet are skipped)."""
    out = []
    for package in SIZE_LIMITED:
        folder = root / "memenc" / package
        for file in sorted(folder.glob("*.py")):
            n = len(file.read_text().splitlines())
            if n > MAX_LINES:
                out.append(f"{file.relative_to(root).as_posix()}: {n} lines")
    return out


def test_no_module_imports_another_packages_underscore_names() -> None:
    assert cross_package_private_imports(REPO) == []


def test_store_and_video_modules_are_at_most_500_lines() -> None:
    assert (REPO / "memenc" / "store" / "__init__.py").is_file()  # the check has work to do
    assert oversized_modules(REPO) == []


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_reports_each_kind_of_violation(tmp_path: Path) -> None:
    for package in ("memenc", "memenc/a", "memenc/b", "memenc/store"):
        _write(tmp_path, f"{package}/__init__.py", "")
    _write(tmp_path, "memenc/a/mod.py", "_hidden = 1\nshown = 2\n")
    # Same package: allowed, absolute or relative.
    _write(
        tmp_path,
        "memenc/a/friend.py",
        "from memenc.a.mod import _hidden\nfrom .mod import _hidden as h\nfrom . import mod\n"
        "x = mod._hidden\n",
    )
    # Another package: every form is reported; public names and dunders are not.
    _write(
        tmp_path,
        "memenc/b/user.py",
        "from memenc.a.mod import _hidden, shown\n"  # 1
        "from memenc.a import mod\n"
        "import memenc.a.mod as m\n"
        "import memenc.a.mod\n"
        "from ..a.mod import _hidden as again\n"  # 5
        "a = mod._hidden\n"  # 6
        "b = m._hidden\n"  # 7
        "c = memenc.a.mod._hidden\n"  # 8
        "d = m.__name__, shown\n",
    )
    _write(tmp_path, "memenc/store/big.py", "x = 1\n" * (MAX_LINES + 1))
    _write(tmp_path, "memenc/store/fits.py", "x = 1\n" * MAX_LINES)
    _write(tmp_path, "memenc/a/big_elsewhere.py", "x = 1\n" * (MAX_LINES + 1))

    assert cross_package_private_imports(tmp_path) == [
        f"memenc/b/user.py:{line} imports _hidden from memenc.a.mod" for line in (1, 5, 6, 7, 8)
    ]
    assert oversized_modules(tmp_path) == [f"memenc/store/big.py: {MAX_LINES + 1} lines"]
