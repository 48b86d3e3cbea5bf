"""The shape of the package, checked from the source with ``ast`` (imports inside functions included).

- no import cycle among capdec's modules;
- the core (everything outside ``capdec.lab`` and ``capdec.cli``) never imports the lab;
- images are opened (``Image.open``) in one module only: :mod:`capdec.images`;
- files are parsed as JSON/JSON Lines in the input and artefact layers, not by hand all over the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "capdec").rglob("*.py"))}


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """capdec modules ``name`` imports anywhere in its body (a package import counts as its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # "from capdec import metrics"
    out = set()
    for module in found:
        while module and module not in known:  # capdec.x.y.func -> capdec.x.y
            module = module.rpartition(".")[0]
        if module.startswith("capdec") and module != name:
            out.add(module)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None.

    Importing a package's __init__ on the way to a submodule is not an edge here: ``capdec`` and the
    package __init__ files import their submodules lazily or not at all (checked below).
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _is_core(name: str) -> bool:
    return not (name.startswith("capdec.lab") or name.startswith("capdec.cli") or name == "capdec.__main__")


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_among_capdec_modules():
    graph = import_graph()
    assert len(graph) > 40
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_never_imports_the_lab():
    graph = import_graph()
    offenders = {name: sorted(m for m in deps if m.startswith("capdec.lab"))
                 for name, deps in graph.items() if _is_core(name)}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"core modules importing the lab: {offenders}"
    assert any(m.startswith("capdec.lab") for m in graph), "the lab package is missing"


def _calls(path: Path, dotted: str) -> int:
    owner, attr = dotted.rsplit(".", 1)
    n = 0
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
                and isinstance(node.func.value, ast.Name) and node.func.value.id == owner):
            n += 1
    return n


def test_images_are_opened_in_one_module_only():
    openers = sorted(name for name, path in _modules().items() if _calls(path, "Image.open"))
    assert openers == ["capdec.images"]


@pytest.mark.parametrize("call", ["json.loads", "json.load"])
def test_user_files_are_parsed_in_the_input_layer(call):
    """The core parses JSON in the input layer (capdec.io.text: every user file) and the artefact layer
    (capdec.artifacts, capdec.utils.read_artifact_json) only; a hand-written parse elsewhere would bring its
    own error messages, and escape the input layer's hardening."""
    allowed = {"capdec.io.text", "capdec.artifacts", "capdec.utils"}
    parsers = sorted(name for name, path in _modules().items()
                     if _is_core(name) and name not in allowed and _calls(path, call))
    assert parsers == []
