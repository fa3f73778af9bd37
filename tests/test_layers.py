"""The layout's rules, as docs/architecture.md draws them: each part of `tasks/` imports only
the parts below it, nothing in `tasks/` imports `flows/`, and no module imports itself in a
circle. Imports inside functions count too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Each part of the project and its layer, lowest first. The shared ground (`tasks/*.py`) may
#: use itself; a stage package only what is strictly below it, and its own modules.
LAYERS: dict[str, int] = {
    "tasks.settings": 0,
    "tasks.text": 0,
    "tasks.files": 0,
    "tasks.vectors": 0,
    "tasks.progress": 0,
    "tasks.models": 0,
    "tasks.workspace": 0,
    "tasks.llm": 1,
    "tasks.ingest": 1,
    "tasks.store": 1,
    "tasks.retrieval": 2,
    "tasks.questions": 3,
    "tasks.training": 4,
    "tasks.learn": 5,
    "tasks.serving": 6,
    # the two ways in: the pipeline's flows, and what an app imports; neither uses the other
    "flows": 7,
    "ragtune": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for folder in ("tasks", "flows", "ragtune")
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                found.add(target)
                break
            parent = target.rpartition(".")[0]
            if parent in known and parent != name and target not in known:
                found.add(parent)
                break
    return found


def part(name: str) -> str:
    """The entry of LAYERS a module belongs to."""
    candidates = [key for key in LAYERS if name == key or name.startswith(key + ".")]
    if not candidates:
        raise AssertionError(f"{name} is in no layer of LAYERS: add it (and to the docs)")
    return max(candidates, key=len)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        if name not in ("tasks", "flows"):
            part(name)


def test_no_layer_imports_a_higher_or_sibling_layer(graph):
    wrong = []
    for name, targets in graph.items():
        if name in ("tasks", "flows"):
            continue
        mine = part(name)
        for target in targets:
            theirs = part(target)
            same_part = theirs == mine
            both_shared = LAYERS[mine] == LAYERS[theirs] == 0
            if not (same_part or both_shared or LAYERS[theirs] < LAYERS[mine]):
                wrong.append(f"{name} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components: each component of more than one module is a
    circle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_in_a_circle(graph):
    assert not circles(graph)


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The checks themselves: an import from a lower layer up, and two modules importing each
    other, are both found."""
    (tmp_path / "a.py").write_text("from tasks.learn.judges import make_judge\n")
    found = imports("tasks.llm.a", tmp_path / "a.py", {"tasks.learn.judges"})
    assert found == {"tasks.learn.judges"}
    assert LAYERS[part("tasks.learn.judges")] > LAYERS[part("tasks.llm.a")]
    (tmp_path / "b.py").write_text("def f():\n    from tasks.text import shorten\n")
    assert imports("tasks.x", tmp_path / "b.py", {"tasks.text"}) == {"tasks.text"}
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_the_architecture_page_names_every_module():
    """docs/architecture.md is the map: a module it leaves out is one a newcomer cannot find."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = page.split("## Layout", 1)[1].split("```")[1]
    folder = package = ""
    named: set[str] = set()
    for line in layout.splitlines():
        words = line.split()
        if not words:
            continue
        indent = len(line) - len(line.lstrip())
        if words[0].endswith("/"):
            # A top-level folder (flush left) or a package inside it (indented).
            if indent == 0:
                folder = package = words[0]
            else:
                package = folder + words[0]
            continue
        # Modules of the folder itself are indented once, those of a package twice.
        where = folder if indent <= 2 else package
        for word in words:
            if not word.endswith(".py"):
                break
            named.add(where + word)
    missing = [
        str(path.relative_to(ROOT))
        for path in modules().values()
        if path.name != "__init__.py" and str(path.relative_to(ROOT)) not in named
    ]
    assert not missing, f"docs/architecture.md leaves out {missing}"
