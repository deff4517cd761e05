"""The folder tree is the architecture: one package per stage, each saying what it owns and may import,
imports pointing one way (data and models never import training or evaluation), no import cycle between
modules, no module over 400 lines. Imports inside functions count as much as those at the top."""

import ast
import os

import pytest
from conftest import ROOT

PACKAGE = "minicpm_finetune"
# What each stage (a folder) or top-level module may import from the package besides itself.
MAY_IMPORT = {
    "cli": set(),
    "models": {"cli"},
    "data": {"cli", "models"},
    "evaluation": {"cli", "models", "data"},
    "export": {"cli", "models", "data"},
    "training": {"cli", "models", "data", "evaluation", "export"},
    "tiny": {"cli", "models", "data"},
    "advertisegen": {"cli", "data"},
    "metrics": {"evaluation"},  # the flat layout's names, kept for code written against them
    "curves": {"evaluation"},
    "__init__": {"models"},
}
STAGES = ("models", "data", "evaluation", "export", "training")
MAX_LINES = 400


def modules():
    """{dotted module name: source path} of every module of the package."""
    found = {}
    for folder, _, names in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name, path, known):
    """The package modules that ``name`` imports anywhere in its code (``from .x import y`` counts as the
    module ``x.y`` when that is a module, else ``x``)."""
    is_package = path.endswith("__init__.py")
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            origin = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join(origin + ([node.module] if node.module else []))
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module
                       for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target.split(".")[0] == PACKAGE and target != name}
    return found


def unit(module):
    """The stage or top-level module a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_tree_shows_the_stages_each_saying_what_it_owns_and_may_import():
    for stage in STAGES:
        init = os.path.join(ROOT, PACKAGE, stage, "__init__.py")
        with open(init, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        assert doc and "Imports:" in doc, stage
    assert {unit(name) for name in modules()} == set(MAY_IMPORT)


def test_imports_point_one_way(graph):
    wrong = sorted(f"{name} imports {target}" for name, targets in graph.items() for target in targets
                   if unit(target) not in MAY_IMPORT[unit(name)] | {unit(name)})
    assert wrong == []
    # The rule itself: data and models never import training or evaluation.
    assert not {"training", "evaluation"} & (MAY_IMPORT["data"] | MAY_IMPORT["models"])


def test_no_import_cycle_between_modules(graph):
    """Depth-first search for a module that reaches itself; the package's own __init__ files (which only
    name what their folder holds) do not count as edges back."""
    edges = {name: {t for t in targets if t in graph and not graph_is_package_init(t)}
             for name, targets in graph.items()}
    state, cycles = {}, []

    def visit(name, path):
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def graph_is_package_init(name):
    return os.path.isfile(os.path.join(ROOT, *name.split("."), "__init__.py"))


def test_no_module_is_over_400_lines():
    long = {}
    for name, path in modules().items():
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in f)
        if count > MAX_LINES:
            long[name] = count
    assert long == {}


def test_the_names_the_readme_and_docs_use_import_from_where_they_say():
    """Paths written before the stage packages: the data module's names, the metrics, the commands."""
    from minicpm_finetune.advertisegen import verify_archive  # noqa: F401
    from minicpm_finetune.data import (DataError, check_file, encode, example_of, load_conversations,  # noqa: F401
                                       read_records, tokenize_dataset)
    from minicpm_finetune.evaluation.metrics import compute_metrics as evaluation_metrics
    from minicpm_finetune.metrics import compute_metrics
    from minicpm_finetune.tiny import build_tiny  # noqa: F401

    assert compute_metrics is evaluation_metrics
