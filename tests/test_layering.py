"""The package is layered: imports only go down, and no module imports itself through others.

Layers, bottom to top (``../shared/DESIGN.md``, "Layout"):

0. ``ellm_mkd`` — the library (schema, chain of thought, prompts, readout, backends, cache
   format, metrics, model resolution);
1. ``datamodules`` — readers, validation, splits, the data module;
2. ``lightning_modules``, ``callbacks`` — the models and the distillation;
3. ``ellm_mkd.commands`` (and ``ellm_mkd.__main__``) — every ``ellm-mkd`` command.

Every import counts, including those inside functions: a lazy import still ties the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ellm_mkd", "datamodules", "lightning_modules", "callbacks")
MAX_LINES = 500


def layer(module: str) -> int:
    if module == "ellm_mkd.__main__" or module == "ellm_mkd.commands" or module.startswith("ellm_mkd.commands."):
        return 3
    top = module.split(".")[0]
    return {"ellm_mkd": 0, "datamodules": 1, "lightning_modules": 2, "callbacks": 2}[top]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def known(name: str, modules: set[str]) -> str | None:
    """The project module ``name`` refers to (``a.b.C`` -> ``a.b`` when ``C`` is a class), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    modules = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        me = module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(me, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" for a in node.names] or [base]
            for t in targets:
                dep = known(t, modules)
                if dep is not None and dep != me:
                    deps.add(dep)
        graph[me] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None. A package's ``__init__`` re-exporting its own modules is not a cycle
    unless one of them imports the package back."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_layers_only_import_downwards():
    graph = import_graph()
    assert len(graph) > 40, "the scan found too few modules: is it looking at the right folders?"
    upward = sorted(
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph.items()
        for d in deps
        if layer(d) > layer(m)
    )
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_look_for():
    # an upward import and a cycle in a made-up graph are found (so a green run means something)
    assert (
        layer("ellm_mkd.cot") < layer("datamodules.splits") < layer("callbacks.mkd") < layer("ellm_mkd.commands.demo")
    )
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    node = ast.parse("from ..schema import X").body[0]
    assert resolve("datamodules.text", False, node) == "schema"
    assert known("lightning_modules.teacher.TeacherLM", {"lightning_modules.teacher"}) == "lightning_modules.teacher"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_source_file_over_500_lines(package):
    fat = {
        str(p.relative_to(REPO)): n
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not fat, f"split these files (over {MAX_LINES} lines): {fat}"
