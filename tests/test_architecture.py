"""The package's shape, computed from its sources (mexit/, and kernels/ and bench/ as the `mexit.kernels` and
`mexit.bench` packages read them): imports only go down the layers, no cycle, the longest import chain inside mexit/
is at most 7 modules, the type-only imports under `if TYPE_CHECKING` included, and one loop in the package steps a
generation."""

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mexit"
# lowest first; a module may import its own layer and the ones below
LAYERS = {"version": 0, "values": 0, "kernels": 0, "timing": 1, "ops": 1, "model": 2, "training": 3, "decoding": 3,
          "engines": 4, "generate": 5, "frontends": 6, "bench": 7, "__init__": 7, "__main__": 7}
MAX_CHAIN = 7  # the longest chain of imports, type-only ones included
OUTSIDE = ("kernels", "bench")  # top-level folders read as mexit's subpackages of the same name


def sources() -> list[Path]:
    return sorted([*ROOT.rglob("*.py"), *(p for name in OUTSIDE for p in (ROOT.parent / name).glob("*.py"))])


def module_name(path: Path) -> str:
    if path.parent.name in OUTSIDE and path.parent.parent == ROOT.parent:
        return f"mexit.{path.parent.name}.{path.stem}"
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_modules(path: Path, modules: set[str], type_only: bool = False) -> set[str]:
    """mexit modules `path` imports (at module level or inside functions), or with type_only those it imports under
    `if TYPE_CHECKING` only."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node, typing_only=False):
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing_only)
            return
        if typing_only != type_only and isinstance(node, (ast.Import, ast.ImportFrom)):
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
            visit(child, typing_only)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


@functools.cache
def graph(type_only: bool = False) -> dict[str, set[str]]:
    """{module: the mexit modules it imports}; type_only: the edges under `if TYPE_CHECKING` alone."""
    paths = sources()
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules, type_only) for p in paths}


@functools.cache
def full_graph() -> dict[str, set[str]]:
    return {m: graph()[m] | graph(True)[m] for m in graph()}


@functools.cache
def reexports_only() -> set[str]:
    """Package `__init__` modules that define nothing: an import of one counts as the imports it re-exports."""
    out = set()
    for path in (p for p in sources() if p.name == "__init__.py"):
        if not any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(path.read_text()).body):
            out.add(module_name(path))
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__" if len(parts) == 1 else parts[1]]


def test_imports_only_go_down():
    """Type-only imports too: a type named from a higher layer is a dependency the wrong way."""
    upward = [(a, b) for a, targets in full_graph().items() for b in targets if layer(b) > layer(a)]
    assert upward == []


def test_the_graph_sees_kernels_bench_and_type_only_imports():
    """The checks above cover the kernels and bench modules and the TYPE_CHECKING edges (listed when they fail)."""
    g, typed = graph(), graph(True)
    assert "mexit.ops" in {m for targets in g.values() for m in targets} and "mexit.kernels.exit_decide_ref" in g
    assert "mexit.bench.ablate" in g and "mexit.bench.common" in g["mexit.bench.ablate"]
    assert "mexit.model.decoder" in typed["mexit.decoding.early_exit"]


def test_front_ends_import_no_benchmark():
    """mexit.bench builds on the front ends; the front ends reach nothing of it (the bench commands join the CLI
    through `mexit.__main__`)."""
    assert [(a, b) for a, targets in full_graph().items() if a.startswith("mexit.frontends")
            for b in targets if b.startswith("mexit.bench")] == []


def longest_chain(edges: dict[str, set[str]]) -> tuple:
    """The longest import chain inside mexit/ (kernels/ and bench/ modules left out; a package `__init__` that only
    re-exports is not a link). Error: an import cycle."""
    g = {m: t for m, t in edges.items() if not m.startswith(tuple(f"mexit.{name}." for name in OUTSIDE))}

    @functools.cache
    def longest(module: str, path: tuple = ()) -> tuple:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        own = () if module in reexports_only() else (module,)
        return max((own + longest(t, path + (module,)) for t in g[module] if t in g), key=len, default=own)

    return max((longest(m) for m in g), key=len)


def test_no_cycle_and_short_chains():
    worst = longest_chain(full_graph())
    assert len(worst) <= MAX_CHAIN, " -> ".join(worst)


def test_one_loop_steps_a_generation():
    """Decode steps are advanced in exactly one place: the loop of mexit/generate.py."""
    sites = []
    for path in sources():
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


def test_the_cache_owns_its_writes():
    """Outside mexit/model (and the benchmarks, which fill caches with random keys), nothing writes a KV cache's
    tensors (k, v, valid, health) by assignment or an in-place method, on the tensor or a part of it: the cache's
    own methods do (`start`, `mark`, `update`), or an op handed the tensors. `valid` and `health` count under any
    name (an alias of the cache), `k` and `v` on a name ending in `cache`."""
    def cache_tensor(node) -> bool:
        while isinstance(node, ast.Subscript):
            node = node.value
        if not isinstance(node, ast.Attribute):
            return False
        return node.attr in ("valid", "health") and ast.unparse(node.value) != "batch" or (
            node.attr in ("k", "v") and ast.unparse(node.value).split(".")[-1].endswith("cache"))

    writes = []
    for path in sources():
        if module_name(path).startswith(("mexit.model", "mexit.bench")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            hit = any(cache_tensor(t) for t in targets)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_"):
                hit |= cache_tensor(node.func.value)
            if hit:
                writes.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert writes == []


def test_engines_read_only_what_a_mode_declares():
    """The engines and the loop know no mode: every attribute they read of a mode (`mode.X`, `self.mode.X`) is one
    the `Mode` base class declares (an attribute, an annotation or a method), so a mode speaks to them only through
    it; and the loop tests no mode's type."""
    from mexit.decoding.step import Mode

    declared = set(dir(Mode)) | set(Mode.__annotations__)
    read = set()
    for path in [*(ROOT / "engines").glob("*.py"), ROOT / "generate.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value).split(".")[-1] == "mode":
                read.add((path.name, node.attr))
    assert read and {(name, attr) for name, attr in read if attr not in declared} == set()
    from mexit.decoding import modes

    mode_modules = {f"mexit.decoding.{entry.module}" for entry in modes.MODES} | {"mexit.decoding.modes"}
    assert not full_graph()["mexit.generate"] & mode_modules  # the loop cannot name a mode's type


def test_modes_speak_only_rows():
    """A mode reaches the batch only through `Rows`: no decoding/ module touches the KV cache, writes the step state
    (`io`) by assignment or an in-place method, or runs the model's blocks (`run_layers`, `run_to`, `embed`,
    `fill_kv`; `forward`, the one whole-sequence pass, serves teacher forcing and layer predictions), and every
    attribute read of `rows` is one the protocol declares."""
    from mexit.decoding.step import Rows

    declared = set(dir(Rows)) | set(Rows.__annotations__)
    found = []
    for path in (ROOT / "decoding").glob("*.py"):
        if path.name == "step.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute):
                base = ast.unparse(node.value)
                if base == "rows" and node.attr not in declared or node.attr == "cache":
                    found.append(f"{where} reads {base}.{node.attr}")
                if node.attr in ("run_layers", "run_to", "embed", "fill_kv"):
                    found.append(f"{where} runs {base}.{node.attr}")
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            written = [t.value if isinstance(t, ast.Subscript) else t for t in targets]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.endswith("_"):
                written.append(node.func.value)
            for t in written:
                if ast.unparse(t).startswith(("rows.io.", "io.")):  # the step state, or its usual alias
                    found.append(f"{where} writes {ast.unparse(t)}")
    assert found == []


def test_only_ops_reaches_the_kernels():
    """The one dispatch point: inside mexit/, only mexit.ops imports mexit.kernels (the layers above take what they
    need, StepIO, ExitHeadOutput, from mexit.ops), type-only imports included."""
    reach = {a for a, targets in full_graph().items() for b in targets
             if b.startswith("mexit.kernels") and not a.startswith(("mexit.ops", "mexit.kernels", "mexit.bench"))}
    assert reach == set()
