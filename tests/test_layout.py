"""The package tree keeps its rules: imports point one way, private stays private, no cycles, a light import.

Read from the source with ``ast`` (function-level imports included), so a rule breaks the build the
moment an import breaks it, whether or not a test happens to run that line.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnscope"

#: What each unit of the tree may import from the rest of attnscope (besides itself). A unit is a
#: stage package or a top-level module. The same table is in docs/index.md; a test checks they agree.
ALLOWED = {
    "errors": set(),
    "tokens": {"errors"},
    "selection": {"errors"},
    "_lazy": set(),
    "hooks": {"errors"},
    "store": {"errors", "tokens"},
    "stats": {"errors", "tokens", "selection", "store"},
    "plot": {"errors", "tokens", "selection", "store", "stats", "_lazy"},
    "capture": {"errors", "tokens", "selection", "hooks", "store"},
    "regulate": {"errors", "tokens", "selection", "hooks", "stats"},
    "models": {"errors", "tokens", "selection", "hooks", "store", "capture", "stats", "plot", "regulate", "_lazy"},
    "rerun": {"errors", "tokens", "selection", "hooks", "capture", "store", "stats", "plot", "models"},
    "sweep": {"errors", "selection", "store", "capture", "stats", "models"},
    "testing": {"errors", "models"},
}
#: Units on top: they may use any public name of the package.
TOP = {"__init__", "__main__", "cli"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name) is not None and MODULES[name].name == "__init__.py"


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """``(target module, imported names, line)`` for every import of ``path`` into attnscope."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "attnscope"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "attnscope":
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                if sub in MODULES:
                    found.append((sub, [], node.lineno))
                else:
                    found.append((module, [alias.name], node.lineno))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _private_owner(module: str) -> str | None:
    """The package a private module belongs to (``attnscope.plot._heatmaps`` -> ``attnscope.plot``)."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_the_tree_has_the_stage_packages():
    stages = {"models", "hooks", "capture", "store", "stats", "plot", "regulate", "rerun", "sweep"}
    assert stages <= {n.split(".")[1] for n in MODULES if n.count(".") >= 1 and _is_package(n)}
    assert "attnscope.hooks.families.unet" in MODULES
    assert set(ALLOWED) | TOP >= {_unit(n) for n in MODULES}, "a new unit needs a row in ALLOWED and docs/index.md"


def test_imports_point_one_way():
    wrong = []
    for module, imports in GRAPH.items():
        unit = _unit(module)
        if unit in TOP:
            continue
        for target, _, line in imports:
            there = _unit(target)
            if there != unit and there not in ALLOWED[unit]:
                wrong.append(f"{module}:{line} imports {target} ({unit} may import {sorted(ALLOWED[unit]) or 'nothing'})")
    assert not wrong, "\n".join(wrong)


def test_hooks_know_no_client_and_store_stats_plot_never_import_hooks():
    assert not ALLOWED["hooks"] & {"capture", "store", "stats", "plot", "regulate", "rerun", "models", "testing"}
    assert all("hooks" not in ALLOWED[u] for u in ("store", "stats", "plot"))


def _private_violations(module: str, imports: list[tuple[str, list[str], int]]) -> list[str]:
    wrong = []
    for target, names, line in imports:
        owner = _private_owner(target)
        if owner is not None and not (module == owner or module.startswith(owner + ".")):
            wrong.append(f"{module}:{line} imports the private module {target} of {owner}")
        wrong += [f"{module}:{line} imports the private name {n} from {target}"
                  for n in names if n.startswith("_") and not n.startswith("__")]
    return wrong


def test_no_module_imports_private_names_or_another_package_s_private_modules():
    wrong = [v for module, imports in GRAPH.items() for v in _private_violations(module, imports)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source, expected", [
    ("from ..plot._heatmaps import mean_word_maps\n", "private module attnscope.plot._heatmaps"),
    ("from ..rerun._rerun import rerun\n", "private module attnscope.rerun._rerun"),
    ("from ._convergence import _LABEL\n", "private name _LABEL"),
    ("from ._convergence import convergence\nfrom .._lazy import lazy_exports\n", None),
])
def test_the_private_rule_catches_what_it_should(source, expected, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    found = _private_violations("attnscope.stats._reports", _imports("attnscope.stats._reports", probe))
    assert (any(expected in v for v in found) if expected else not found), found


def test_production_code_never_imports_testing():
    users = [f"{m}:{line}" for m, imports in GRAPH.items() if m != "attnscope.testing"
             for target, _, line in imports if target == "attnscope.testing"]
    assert not users


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in imports if t in MODULES and t != m} for m, imports in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_docs_table_says_what_the_rule_checks():
    text = (ROOT / "docs" / "index.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)(?:/|\.py)` \|[^|]*\| ([^|]*) \|$", text, flags=re.M))
    assert set(rows) >= set(ALLOWED), f"docs/index.md lacks rows for {set(ALLOWED) - set(rows)}"
    for unit, cell in rows.items():
        if unit in ALLOWED:
            documented = set(re.findall(r"`([a-z_]+)`", cell))
            assert documented == ALLOWED[unit], f"docs/index.md: {unit} may import {documented}, the test says {ALLOWED[unit]}"


def test_import_attnscope_loads_no_plotting_or_dask():
    code = ("import sys, attnscope; "
            "print(' '.join(m for m in ('matplotlib', 'seaborn', 'dask', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_lazy_exports_resolve_to_the_documented_objects():
    import attnscope as ats

    assert ats.plot.heatmaps.__module__ == "attnscope.plot._heatmaps"
    assert ats.plot.comparison.__module__ == "attnscope.plot._compare"
    assert ats.shapes.load_shapes_pipeline.__module__ == "attnscope.models.shapes._model"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = ats.plot.nope


def test_every_package_exports_what_its_all_names():
    import importlib

    for name in MODULES:
        if _is_package(name) and _private_owner(name) is None:
            package = importlib.import_module(name)
            missing = [n for n in getattr(package, "__all__", []) if not hasattr(package, n)]
            assert not missing, f"{name}.__all__ names {missing}, which it does not define"
