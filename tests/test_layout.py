"""The package's layering (docs/architecture.md): no import circle among recbole_mm's modules, and
the lower layers never import the higher ones, not even inside a function."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "recbole_mm"
# Higher layers: orchestration (quick_start), experiment tooling, analysis tools and the aliases of
# older command paths.
HIGHER = ("recbole_mm.quick_start", "recbole_mm.experiments", "recbole_mm.tools", "recbole_mm.tune",
          "recbole_mm.distributed", "recbole_mm.fmrlrec_tools", "recbole_mm.embedding_analysis",
          "recbole_mm.pipelines")
LOWER = ("recbole_mm.config", "recbole_mm.data", "recbole_mm.utils", "recbole_mm.evaluator",
         "recbole_mm.model", "recbole_mm.trainer", "recbole_mm.compat")


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def resolve(name):
    """The recbole_mm module an import statement names (``from a.b import c``: a.b.c if c is a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(path, top_level_only):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {resolve(name) for name in names if name.startswith("recbole_mm")}
    return found - {None}


def in_layer(module, layer):
    return any(module == prefix or module.startswith(prefix + ".") for prefix in layer)


def test_every_module_is_found():
    assert {"recbole_mm.config.configurator", "recbole_mm.quick_start.quick_start",
            "recbole_mm.experiments.table", "recbole_mm.model.layers.ssd"} <= set(MODULES)


def find_circle(graph):
    """One import circle of ``graph`` (module -> imported modules) as a list of names, or None."""
    state = {}  # name -> "visiting" | "done"

    def visit(name, trail):
        if state.get(name) == "visiting":
            return trail[trail.index(name):] + [name]
        if state.get(name) == "done":
            return None
        state[name] = "visiting"
        for target in sorted(graph.get(name, ())):
            circle = visit(target, trail + [name])
            if circle:
                return circle
        state[name] = "done"
        return None

    for name in sorted(graph):
        circle = visit(name, [])
        if circle:
            return circle
    return None


def test_the_checker_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_at_module_level():
    graph = {name: imports(path, top_level_only=True) - {name} for name, path in MODULES.items()}
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_lower_layers_never_import_higher_ones():
    offenders = [
        f"{name} imports {target}"
        for name, path in MODULES.items() if in_layer(name, LOWER)
        for target in imports(path, top_level_only=False) if in_layer(target, HIGHER)
    ]
    assert not offenders, offenders
