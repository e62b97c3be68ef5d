"""The package's layout: every module imports on its own, the import graph (lazy imports
included) has no cycle, nothing outside ``cli/`` imports from the CLI, and every import points
down the layers (models and data, checkpoint, fcmae, training, the recipes and tasks, tools
and demos, the CLI)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "convnextv2"


def _module_name(path: Path) -> str:
    parts = ["convnextv2", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """Package-internal modules that ``name`` imports anywhere in its body (lazy ones too)."""
    return _imports_in(path.read_text(), name, is_package=path.name == "__init__.py")


def _imports_in(source: str, name: str, is_package: bool) -> set[str]:
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # each imported name that is a module counts; else the module it comes from
            modules = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            candidates = modules or {target}
        elif isinstance(node, ast.Import):
            candidates = {a.name for a in node.names}
        else:
            continue
        found |= {c for c in candidates if c in MODULES and c != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _is_package_init(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def test_import_graph_has_no_cycle():
    # Package __init__ files only re-export; an edge "x -> package" stands for the package's
    # submodules, so cycles are checked between real modules.
    def edges(name):
        for t in GRAPH[name]:
            if _is_package_init(t) and not name.startswith(t + ".") and t != "convnextv2":
                yield from (e for e in GRAPH[t] if e.startswith(t + "."))
            elif not _is_package_init(t):
                yield t

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in edges(n):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(MODULES):
        if n not in state and not _is_package_init(n):
            visit(n)


def test_library_never_imports_the_cli():
    offenders = {n: sorted(t for t in deps if t.startswith("convnextv2.cli"))
                 for n, deps in GRAPH.items()
                 if not n.startswith("convnextv2.cli") and n != "convnextv2.__main__"}
    assert not {n: d for n, d in offenders.items() if d}


def test_every_module_imports_in_a_fresh_interpreter():
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n")
    names = sorted(n for n in MODULES if n != "convnextv2.__main__")  # __main__ runs the CLI
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_public_api_is_kept():
    import convnextv2
    for attr in ("create_model", "FCMAE", "load_checkpoint", "save_checkpoint", "ConvNeXtV2",
                 "GRN", "list_models", "convert_state_dict", "load_model"):
        assert getattr(convnextv2, attr) is not None



MAX_FUNCTION_LINES = 80
# Known offenders, each to be split by its owner; an entry that is fixed must leave this list.
LONG_FUNCTIONS_TO_SPLIT: set[str] = set()


def test_no_function_is_longer_than_80_lines():
    long = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long.add(f"{name}.{node.name}")
    assert long - LONG_FUNCTIONS_TO_SPLIT == set(), "split these functions"
    assert LONG_FUNCTIONS_TO_SPLIT - long == set(), "fixed: remove from LONG_FUNCTIONS_TO_SPLIT"

# Bottom to top. A module may import from its own layer or a lower one, never from above:
# the shared pieces stay usable without the jobs built on them.
LAYERS = (
    ("models", "data"),
    ("checkpoint",),
    ("fcmae",),
    ("training",),
    ("recipes", "detection", "segmentation", "transfer", "analysis"),
    ("tools", "demos"),
    ("cli", "__main__", ""),           # "": the package facade, convnextv2/__init__.py
)


def _layer(name: str) -> int:
    part = name.split(".")[1] if "." in name else ""
    for level, members in enumerate(LAYERS):
        if part in members:
            return level
    pytest.fail(f"{name}: its package {part!r} has no place in LAYERS; add it there")


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} (layer {_layer(name)}) imports {t} (layer {_layer(t)})"
                  for name, deps in graph.items() for t in deps if _layer(t) > _layer(name))


def test_every_import_points_down_the_layers():
    upward = _upward(GRAPH)
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_layer_check_sees_lazy_imports_and_each_imported_module():
    # a function-level import counts like a top-level one
    lazy = "def pretrained():\n    from ..checkpoint import load_pretrained\n"
    deps = _imports_in(lazy, "convnextv2.models.registry", is_package=False)
    assert deps == {"convnextv2.checkpoint"}
    assert _upward({"convnextv2.models.registry": deps}) == [
        "convnextv2.models.registry (layer 0) imports convnextv2.checkpoint (layer 1)"]
    # every module named in one statement counts, not only the first
    deps = _imports_in("from .. import training, demos\n", "convnextv2.recipes.pretrain",
                       is_package=False)
    assert deps == {"convnextv2.training", "convnextv2.demos"}
    assert len(_upward({"convnextv2.recipes.pretrain": deps})) == 1
    # same layer and below are fine; the facade and the CLI may import anything
    assert not _upward({"convnextv2.demos.transfer": {"convnextv2.tools.presets",
                                                      "convnextv2.detection.train"},
                        "convnextv2": {"convnextv2.fcmae.fcmae"},
                        "convnextv2.cli.demo": {"convnextv2.demos.transfer"}})
