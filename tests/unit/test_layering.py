"""The package's shape, checked from its source: imports flow down the layers, no import cycles
(imports inside functions and under TYPE_CHECKING count), functions <= 60 lines, modules <= 450.

See docs/design.md ("Layers") for the picture this test holds the code to.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "tcli"

# Units are sub-packages and top-level modules. The lower layers never import the upper ones.
LOWER = {"io", "algos", "models", "engines", "verifiers", "trackers", "tools", "records", "registry",
         "errors"}
UPPER = {"stages", "loop", "commands", "cli", "train"}
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 450


def _module_name(path: Path) -> str:
    return _module_name_under(path, ROOT.parent)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The tcli module an import names (a name imported from a package may be a submodule)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] != "tcli":
                continue
            target = _resolve(n, mods)
            if target and target != mod:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "tcli"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_import_cycles():
    assert _cycles(_graph()) == []


def test_no_cycles_between_subpackages():
    units: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        u = _unit(mod)
        units.setdefault(u, set()).update(_unit(d) for d in deps if _unit(d) != u)
    units.pop("tcli", None)  # the package's face (tcli/__init__.py) names nothing below
    assert _cycles(units) == []


def test_lower_layers_never_import_upper_ones():
    bad = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps
                 if _unit(m) in LOWER and _unit(d) in UPPER)
    assert bad == []


def test_module_and_function_sizes():
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        src = path.read_text()
        rel = path.relative_to(ROOT.parent)
        if len(src.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert too_long == []


def test_the_checks_see_what_they_look_for(tmp_path):
    """A cycle and a function-level import of an upper layer are found (the test can fail)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    pkg = tmp_path / "tcli"
    (pkg / "io").mkdir(parents=True)
    (pkg / "stages").mkdir()
    for f in ("__init__.py", "io/__init__.py", "stages/__init__.py", "stages/sample.py"):
        (pkg / f).write_text("")
    (pkg / "io" / "read.py").write_text("def f():\n    from tcli.stages.sample import X\n")
    mods = {_module_name_under(p, tmp_path): p for p in sorted(pkg.rglob("*.py"))}
    assert _imports("tcli.io.read", pkg / "io" / "read.py", mods) == {"tcli.stages.sample"}


def _module_name_under(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
