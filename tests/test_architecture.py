"""The tree is the architecture: layers import downwards only, every module imports in a fresh interpreter in
layer order (no cycle), and a module longer than the limit says why in its docstring."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Layer of each package, bottom first; a module may import its own package and lower layers only.
# Packages sharing a layer are siblings that must not import each other.
LAYERS: dict[str, int] = {
    "magral_core": 0,  # config, errors, atomic, structures, boxes: shared records
    "magral_core.datasets": 1,
    "magral_core.vision": 2,
    "magral_core.method": 3,
    "magral_core.studio": 3,
    "magral_core.service": 4,
    "magral_core.simulation": 4,
    "backend": 5,
    "magral_core.cli": 6,
    "benchmarks": 7,
}
LINE_LIMIT = 300
REASON = "one module because"  # the docstring phrase that gives a longer module's reason


def modules() -> list[tuple[str, Path]]:
    found = []
    for top in ("magral_core", "backend", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found.append((name, path))
    return found


def package_of(module: str) -> str:
    """The longest `LAYERS` key that `module` lies in (a module directly in magral_core is in the base)."""
    best = ""
    for package in LAYERS:
        if (module == package or module.startswith(package + ".")) and len(package) > len(best):
            best = package
    if best == "magral_core" and module.count(".") >= 1:
        sub = "magral_core." + module.split(".")[1]
        if (ROOT / sub.replace(".", "/")).is_dir():
            raise AssertionError(f"package {sub} has no layer in LAYERS")
    return best


def imports_of(path: Path, module: str, *, top_level_only: bool = False) -> set[str]:
    """Every project module `path` imports, at module level or (unless `top_level_only`) inside functions."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in out if m.split(".")[0] in ("magral_core", "backend", "benchmarks")}


def test_every_import_runs_down_the_layers() -> None:
    known = {name for name, _ in modules()}
    wrong = []
    for name, path in modules():
        own = package_of(name)
        for target in imports_of(path, name):
            if target not in known:
                continue  # `from package import name` adds the name too; only real modules count
            theirs = package_of(target)
            if theirs != own and LAYERS[theirs] >= LAYERS[own]:
                wrong.append(f"{name} imports {target} ({own} layer {LAYERS[own]} → {theirs} layer "
                             f"{LAYERS[theirs]})")
    assert wrong == []


def test_every_module_imports_alone_in_layer_order() -> None:
    ordered = sorted((LAYERS[package_of(n)], n) for n, _ in modules() if not n.startswith("benchmarks"))
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for _, n in ordered)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(("name", "path"), modules(), ids=lambda v: str(v))
def test_a_long_module_says_why(name: str, path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if lines > LINE_LIMIT:
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        assert REASON in " ".join(docstring.split()), f"{name}: {lines} lines and no reason in its docstring"


def test_no_import_cycle_at_module_level() -> None:
    """Module-level imports (the ones that run on import) form no cycle, inside a package or across."""
    known = {name for name, _ in modules()}
    graph = {
        name: {m for m in imports_of(path, name, top_level_only=True) if m in known and m != name}
        for name, path in modules()
    }
    seen: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                return [*stack, node, nxt]
            if nxt not in seen and (cycle := visit(nxt, [*stack, node])):
                return cycle
        seen[node] = 2
        return None

    for start in sorted(graph):
        if start not in seen:
            cycle = visit(start, [])
            assert cycle is None, " → ".join(cycle or [])
