"""The house plan holds: no import cycles, and every import runs from a room to a lower floor.

The floors are declared once, in docs/architecture.md ("Layering"); this test reads them there.
Imports are found with `ast` in every module of src/ettin, at module level and inside functions
alike (an import hidden in a function is still a dependency). A module named in a string counts
as an import too: `[sys.executable, "-m", "ettin.train"]`, `"python -m ettin.train"` or
`importlib.import_module("ettin.demo")` run that module as surely as an import statement does
(docstrings and other bare string statements are prose, not code, and are left out).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def module_files(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is_package)} for every module under src/ettin."""
    out = {}
    for path in sorted((src / "ettin").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


_MODULE_STRING = re.compile(r"ettin(?:\.\w+)+")
_RUN_MODULE = re.compile(r"-m\s+(ettin(?:\.\w+)+)")


def named_modules(tree: ast.AST) -> list[str]:
    """Modules named by the string constants of a module's code: the whole string a dotted
    `ettin.` name (`"ettin.train"`, as in `[sys.executable, "-m", "ettin.train"]` or
    `import_module("ettin.demo")`), or a command line holding `-m ettin.<module>`. Bare string
    statements (docstrings, field docstrings) are prose and are left out."""
    prose = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            if _MODULE_STRING.fullmatch(node.value):
                found.append(node.value)
            found += _RUN_MODULE.findall(node.value)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """{module: the ettin modules it imports or names to run}, with `from pkg import mod`
    resolved to the module."""
    mods = module_files(src)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in [*ast.walk(tree), *named_modules(tree)]:
            if isinstance(node, str):
                found = [node]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                found = [mod] + [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
            else:
                continue
            for target in found:
                if not (target == "ettin" or target.startswith("ettin.")):
                    continue
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target not in (name, "ettin"):  # the package root holds only the version
                    targets.add(target)
        graph[name] = targets
    return graph


def room(module: str) -> str | None:
    """The room a module lives in: a top-level module or a subpackage; every `cli` is the `cli` room."""
    parts = module.split(".")[1:]
    if not parts:
        return None  # the package root (its version only)
    if parts[-1] == "cli":
        return "cli"
    return parts[0]


def declared_floors(text: str | None = None) -> dict[str, int]:
    """{room: floor} from the `floor N: room room ...` lines of docs/architecture.md."""
    text = ARCHITECTURE.read_text() if text is None else text
    floors = {}
    for number, rooms in re.findall(r"^floor (\d+): (.+)$", text, flags=re.M):
        for name in rooms.split():
            assert name not in floors, f"room {name} is on two floors in docs/architecture.md"
            floors[name] = int(number)
    return floors


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layering_problems(graph: dict[str, set[str]], floors: dict[str, int]) -> list[str]:
    """Every cycle, every room without a floor and every import that does not run downwards."""
    problems = [f"cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    rooms = {room(m) for m in graph} - {None}
    problems += [
        f"room '{r}' is on no floor of docs/architecture.md (Layering): add it"
        for r in sorted(rooms - set(floors))
    ]
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = room(src), room(dst)
            if a is None or b is None or a == b or a not in floors or b not in floors:
                continue
            if floors[b] >= floors[a]:
                problems.append(
                    f"upward import: {src} (floor {floors[a]}, {a}) -> {dst} (floor {floors[b]}, {b})"
                )
    return problems


def test_imports_follow_the_declared_floors():
    problems = layering_problems(import_graph(), declared_floors())
    assert not problems, "\n".join(problems)


def test_the_checker_sees_cycles_upward_imports_and_undeclared_rooms():
    graph = {
        "ettin.data.a": {"ettin.data.b"},
        "ettin.data.b": {"ettin.data.a"},  # a cycle inside one room still counts
        "ettin.model.m": {"ettin.train"},  # the model may not know the trainer
        "ettin.train": {"ettin.model.m"},
        "ettin.extra": set(),
    }
    floors = declared_floors("floor 0: model data\nfloor 1: train\n")
    problems = layering_problems(graph, floors)
    assert "cycle: ettin.data.a <-> ettin.data.b" in problems
    assert any(p.startswith("upward import: ettin.model.m") for p in problems)
    assert any("'extra' is on no floor" in p for p in problems)
    assert len(cycles(graph)) == 2  # model.m <-> train is a cycle too


def test_function_level_imports_count(tmp_path):
    pkg = tmp_path / "ettin"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "train.py").write_text("")
    (pkg / "data" / "order.py").write_text("def f():\n    from ettin.train import x\n")
    (pkg / "data" / "cli.py").write_text("from .order import f\nfrom ettin import train\n")
    graph = import_graph(tmp_path)
    assert graph["ettin.data.order"] == {"ettin.train"}
    assert graph["ettin.data.cli"] == {"ettin.data.order", "ettin.train"}
    assert room("ettin.data.cli") == "cli" and room("ettin.data.order") == "data"


def test_modules_launched_by_name_count(tmp_path):
    """A subprocess or importlib call that names a module depends on it like an import."""
    pkg = tmp_path / "ettin"
    (pkg / "data").mkdir(parents=True)
    for name in ("__init__", "train", "demo", "recipe", "data/__init__", "data/order"):
        (pkg / f"{name}.py").write_text("")
    (pkg / "recipe.py").write_text(
        '"""Runs `python -m ettin.demo` (prose: no dependency)."""\n'
        "import subprocess, sys\n"
        "def run(args):\n"
        '    subprocess.run([sys.executable, "-m", "ettin.train", *args])\n'
    )
    (pkg / "data" / "order.py").write_text(
        'import importlib, os\nCMD = "python -m ettin.train x.yaml"\n'
        'def f():\n    return importlib.import_module("ettin.demo")\n'
        'def g():\n    """Not `ettin.recipe`."""\n    return "ettin.data.order"\n'
    )
    graph = import_graph(tmp_path)
    assert graph["ettin.recipe"] == {"ettin.train"}
    assert graph["ettin.data.order"] == {"ettin.train", "ettin.demo"}
    floors = declared_floors("floor 0: data\nfloor 1: recipe\nfloor 2: train demo\n")
    problems = layering_problems(graph, floors)
    assert any(p.startswith("upward import: ettin.recipe (floor 1") for p in problems), problems


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("ettin.data", ("ettin.prep", "ettin.train")),
        ("ettin.checkpoint", ("ettin.interop", "ettin.train")),
    ],
)
def test_importing_a_room_loads_no_room_above_it(module, forbidden):
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.startswith({forbidden!r}))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == [], f"import {module} loaded {loaded}"


def test_the_gpu_harness_sits_on_top():
    """`src/ettin_gpu/` (make gpu-check) imports ettin; nothing in ettin imports or runs it."""
    users = []
    for name, (path, _) in module_files().items():
        tree = ast.parse(path.read_text(), str(path))
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}  # docstrings
        strings = [
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in prose
        ]
        named = [s for s in strings if isinstance(s, str) and re.search(r"\bettin_gpu\b", s)]
        if any(m.split(".")[0] == "ettin_gpu" for m in imported) or named:
            users.append(name)
    assert users == [], f"{users} use the GPU harness: it must stay above the library"
    assert (SRC / "ettin_gpu" / "__main__.py").is_file()  # `python -m ettin_gpu`
