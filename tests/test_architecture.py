"""The package's shape, computed from its sources: imports only go down the layers, no cycle, the longest import
chain is at most 7 modules, and one loop in the package steps a generation."""

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mexit"
# lowest first; a module may import its own layer and the ones below (kernels/ and bench/ live outside mexit/: their
# packages' __init__ modules are here)
LAYERS = {"version": 0, "values": 0, "timing": 0, "ops": 0, "kernels": 0, "model": 1, "training": 2, "decoding": 2,
          "engines": 3, "generate": 4, "frontends": 5, "bench": 6, "__init__": 6, "__main__": 6}
MAX_CHAIN = 7


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """mexit modules `path` imports (at module level or inside functions; not under `if TYPE_CHECKING`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


@functools.cache
def graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


@functools.cache
def reexports_only() -> set[str]:
    """Package `__init__` modules that define nothing: an import of one counts as the imports it re-exports."""
    out = set()
    for path in ROOT.rglob("__init__.py"):
        if not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body):
            out.add(module_name(path))
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__" if len(parts) == 1 else parts[1]]


def test_imports_only_go_down():
    upward = [(a, b) for a, targets in graph().items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_no_cycle_and_short_chains():
    g = graph()

    @functools.cache
    def longest(module: str, path: tuple = ()) -> tuple:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        own = () if module in reexports_only() else (module,)
        return max((own + longest(t, path + (module,)) for t in g[module]), key=len, default=own)

    chains = [longest(m) for m in g]
    worst = max(chains, key=len)
    assert len(worst) <= MAX_CHAIN, " -> ".join(worst)


def test_one_loop_steps_a_generation():
    """Decode steps are advanced in exactly one place: the loop of mexit/generate.py."""
    sites = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "advance":
                sites.append(module_name(path))
    assert sites == ["mexit.generate"]
    loops = [node for node in ast.walk(ast.parse((ROOT / "generate.py").read_text()))
             if isinstance(node, (ast.For, ast.While))]
    assert len(loops) == 1


def test_only_the_cluster_module_imports_ray():
    """Ray is an optional extra: one module of mexit (and none of kernels/ or bench/) imports it."""
    importers = set()
    for path in [*ROOT.rglob("*.py"), *(ROOT.parent / "bench").rglob("*.py"), *(ROOT.parent / "kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(name == "ray" or name.startswith("ray.") for name in names):
                importers.add(str(path.relative_to(ROOT.parent)))
    assert importers == {"mexit/frontends/cluster.py"}
