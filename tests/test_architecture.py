"""The toolkit is plain PyTorch (no class swaps, no methods bound onto modules, no TOOLKIT_*
environment variables), and nothing imports in a circle."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
TOOLKIT = ROOT / "toolkit"
#: Methods of modules that nothing may replace on an instance.
_METHODS = {"forward", "feed_forward_chunk", "__call__", "_call_impl"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _toolkit_files() -> List[Path]:
    return sorted(TOOLKIT.rglob("*.py"))


def _violations(path: Path) -> List[str]:
    """Class swaps, method binding, private attention-implementation writes and TOOLKIT_* names in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(ROOT) if ROOT in path.parents else path.name
    out = []
    for node in ast.walk(tree):
        targets: List[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr == "__class__":
                out.append(f"{where}:{node.lineno}: assigns __class__")
            if isinstance(t, ast.Attribute) and t.attr in _METHODS:
                out.append(f"{where}:{node.lineno}: replaces a module's {t.attr} on an instance")
            if isinstance(t, ast.Attribute) and t.attr == "_attn_implementation":
                out.append(f"{where}:{node.lineno}: writes config._attn_implementation")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and name.value in _METHODS | {"__class__", "_attn_implementation"}:
                out.append(f"{where}:{node.lineno}: setattr of {name.value}")
        if isinstance(node, (ast.Name, ast.Attribute)) and getattr(node, "id", getattr(node, "attr", "")) == "MethodType":
            out.append(f"{where}:{node.lineno}: binds a method with types.MethodType")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("TOOLKIT_"):
            out.append(f"{where}:{node.lineno}: names the environment variable {node.value}")
    return out


def test_no_class_swaps_method_binding_or_toolkit_env_vars():
    bad = [v for f in _toolkit_files() for v in _violations(f)]
    assert not bad, "the toolkit is plain PyTorch:\n" + "\n".join(bad)


def test_the_checks_find_what_they_look_for(tmp_path):
    # The scan itself must see each pattern (a test that cannot fail proves nothing).
    sample = tmp_path / "sample.py"
    sample.write_text(textwrap.dedent("""
        import os, types
        def f(m, cfg):
            m.__class__ = object
            m.forward = types.MethodType(len, m)
            setattr(m, "feed_forward_chunk", None)
            cfg._attn_implementation = "x"
            return os.environ.get("TOOLKIT_X")
    """))
    found = _violations(sample)
    assert len(found) == 6, found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> Dict[str, Set[str]]:
    """toolkit module -> the toolkit modules it imports when it is imported (module-level
    statements, including those under a top-level ``if``/``try``; not imports inside functions)."""
    files = {_module_name(f): f for f in _toolkit_files()}
    graph: Dict[str, Set[str]] = {}

    def top_level(body: List[ast.stmt]):
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                yield stmt
            elif isinstance(stmt, ast.If):
                yield from top_level(stmt.body)
                yield from top_level(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                yield from top_level(stmt.body)
                for h in stmt.handlers:
                    yield from top_level(h.body)
                yield from top_level(stmt.orelse)
                yield from top_level(stmt.finalbody)

    for name, path in files.items():
        deps: Set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for stmt in top_level(tree.body):
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            else:
                base = _resolve(name, path.name == "__init__.py", stmt)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in stmt.names]
            deps.update(t for t in targets if t in files and t != name)
        graph[name] = deps
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import cycle as a list of modules (first = last), or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles_among_toolkit_modules():
    graph = import_graph()
    assert "toolkit.losses.relation_kl.chunked" in graph["toolkit.losses.relation_kl"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None

