"""The shape of the code: the engine's parts depend on each other one way only, the engine
never imports Streamlit, and the explorer reaches the data only through engine.store."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"


def _imports(path: Path) -> list[str]:
    """Absolute names of every module `path` imports (also inside functions), except those
    under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg += ".__init__"
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: -node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append(mod)
            out += [f"{mod}.{a.name}" for a in node.names]
    return out


def _part(module: str) -> str | None:
    """The engine part a module belongs to: engine.<part>…"""
    parts = module.split(".")
    return parts[1] if parts[0] == "engine" and len(parts) > 1 else None


def test_engine_parts_form_no_cycle():
    graph: dict[str, set[str]] = {}
    for f in ENGINE.rglob("*.py"):
        me = _part(".".join(f.relative_to(ROOT).with_suffix("").parts))
        if me in (None, "__init__"):
            continue
        deps = {_part(m) for m in _imports(f)} - {None, me, "__init__"}
        graph.setdefault(me, set()).update(d for d in deps if (ENGINE / d).exists()
                                           or (ENGINE / f"{d}.py").exists())
    seen: dict[str, int] = {}

    def visit(n, stack):
        if seen.get(n) == 1:
            raise AssertionError(f"import cycle: {' → '.join([*stack, n])}")
        if seen.get(n) == 2:
            return
        seen[n] = 1
        for m in sorted(graph.get(n, ())):
            visit(m, [*stack, n])
        seen[n] = 2

    for n in sorted(graph):
        visit(n, [])
    # the low layers stay low
    assert graph.get("sae", set()) <= {"errors"}
    assert graph.get("store", set()) <= {"errors"}
    assert graph.get("metrics", set()) <= {"errors", "runtime"}
    assert graph.get("runtime", set()) <= {"errors"}
    assert not graph.get("openmp")  # imported before torch: nothing of the engine's


def test_engine_never_imports_streamlit():
    for f in ENGINE.rglob("*.py"):
        assert not any(m.split(".")[0] == "streamlit" for m in _imports(f)), f


def test_explorer_pages_read_data_only_through_the_store():
    allowed = ("engine.store", "engine.errors", "engine.metrics.names", "engine.metrics",
               "engine.steering", "engine.models", "engine.formats")
    for f in (ROOT / "explorer").rglob("*.py"):
        for m in _imports(f):
            if m.startswith("engine"):
                assert m.startswith(allowed), f"{f.name} imports {m}"
