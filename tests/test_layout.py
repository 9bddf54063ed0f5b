"""The rooms and their doors, read from the source: which package may import which, and that
every built-in mechanism and task comes in through its entry point, as a plug-in does."""

from __future__ import annotations

import ast
import importlib
import re
from importlib import metadata
from pathlib import Path

import pytest

from attnbench.sweeps.base import SweepFolder

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text()) if tomllib else {}
ENTRY_POINTS = PYPROJECT.get("project", {}).get("entry-points", {})
needs_toml = pytest.mark.skipif(tomllib is None, reason="reading pyproject.toml needs Python 3.11's tomllib")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    package = module_name(path).split(".")
    return imports_of(path, package if path.name == "__init__.py" else package[:-1])


def imports_of(path: Path, package: list[str]) -> set[str]:
    """Every module ``path`` (in ``package``) imports, by its full name: ``import a.b``, ``from a
    import b`` (a.b too: b may be a module), relative imports resolved, ``import_module("…")``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(str(node.args[0].value))
    return found


def reaches(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


@pytest.mark.parametrize("path", modules("attnbench"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_engine_imports_neither_tasks_nor_mechanisms(path):
    names = imports(path)
    assert not reaches(names, "tasks") and not reaches(names, "mechanisms"), (
        f"{path.relative_to(ROOT)} imports {sorted(reaches(names, 'tasks') | reaches(names, 'mechanisms'))}"
        ": the engine finds them through their entry points")


@pytest.mark.parametrize("path", modules("mechanisms"), ids=lambda p: str(p.relative_to(ROOT)))
def test_mechanisms_know_nothing_of_tasks_nor_of_the_cli(path):
    names = imports(path)
    assert not reaches(names, "tasks"), f"{path.relative_to(ROOT)} imports {sorted(reaches(names, 'tasks'))}"
    assert not reaches(names, "attnbench.cli"), f"{path.relative_to(ROOT)} imports attnbench.cli"


@pytest.mark.parametrize("path", modules("tasks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tasks_reach_the_engine_by_its_public_api_and_no_other_task(path):
    names, own = imports(path), module_name(path).split(".")
    assert not reaches(names, "attnbench.cli"), f"{path.relative_to(ROOT)} imports attnbench.cli"
    assert not reaches(names, "mechanisms"), f"{path.relative_to(ROOT)}: mechanisms only through the registry"
    room = own[1] if len(own) > 1 else None  # tasks/<room>/…
    allowed = {"tasks", "tasks.common", f"tasks.{room}"}
    foreign = {n for n in reaches(names, "tasks") if ".".join(n.split(".")[:2]) not in allowed}
    assert not foreign, f"{path.relative_to(ROOT)} imports another task's package: {sorted(foreign)}"
    if room == "common":
        assert reaches(names, "tasks") <= reaches(names, "tasks.common"), (
            f"{path.relative_to(ROOT)}: what the tasks share depends on no task")


def test_the_import_parser_sees_what_it_must(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import a.b\nfrom c import d\nfrom . import e\nimport importlib\n"
                     "importlib.import_module('tasks.x')\n")
    assert {"a.b", "c", "c.d", "tasks.x"} <= imports_of(probe, ["pkg"])


def test_no_file_name_stands_in_for_a_folder():
    underscored = [p.relative_to(ROOT) for p in modules("tasks")
                   if p.name.startswith("_") and p.name != "__init__.py"]
    assert not underscored, f"group by folders, not by filename prefixes: {underscored}"


def registers_a_mechanism(path: Path) -> bool:
    """Whether a module decorates a class with ``register_mechanism`` (else it holds shared helpers)."""
    return any(isinstance(node, ast.ClassDef) and any(
        getattr(d, "id", getattr(d, "attr", None)) == "register_mechanism" for d in node.decorator_list)
        for node in ast.walk(ast.parse(path.read_text(), str(path))))


@needs_toml
def test_every_built_in_mechanism_module_is_an_entry_point():
    """Each module that registers a mechanism is an entry point; modules of shared helpers (kernels
    that several mechanisms import) are not."""
    declared = set(ENTRY_POINTS["attnbench.mechanisms"].values())
    on_disk = {module_name(p) for p in modules("mechanisms")
               if p.name != "__init__.py" and registers_a_mechanism(p)}
    assert declared == on_disk, "pyproject.toml's attnbench.mechanisms entry points and mechanisms/ differ"


def test_the_registration_parser_sees_what_it_must(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("@register_mechanism\nclass A:\n    pass\n")
    helper = tmp_path / "helper.py"
    helper.write_text("def register_mechanism_like():\n    pass\n")
    assert registers_a_mechanism(probe) and not registers_a_mechanism(helper)


@needs_toml
def test_every_task_folder_is_an_entry_point():
    declared = set(ENTRY_POINTS["attnbench.tasks"].values())
    folders = [p.parent.name for p in (ROOT / "tasks").glob("*/__init__.py")]
    on_disk = {f"tasks.{name}" for name in folders if name != "common"}
    assert declared == on_disk, "pyproject.toml's attnbench.tasks entry points and tasks/'s folders differ"


@needs_toml
@pytest.mark.parametrize("group", ["attnbench.mechanisms", "attnbench.tasks"])
def test_the_installed_metadata_has_the_declared_entry_points(group):
    installed = {ep.name: ep.value for ep in metadata.entry_points(group=group)}
    missing = {k: v for k, v in ENTRY_POINTS[group].items() if installed.get(k) != v}
    assert not missing, f"not installed: {missing}; run `pip install -e .` after editing pyproject.toml"


@needs_toml
def test_the_tasks_and_mechanisms_are_installed_packages():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"attnbench*", "mechanisms*", "tasks*"} <= set(include)


# ---- the engine's rooms: imports flow one way ------------------------------------------------


def engine_imports(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """The import graph of ``package`` (its folder under ``root``): module -> the modules of the
    package it imports, at module level or inside a function (``from a import b`` is a.b where b is
    a module); and module -> its imports of the package made inside a function."""
    paths = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    inside: dict[str, list[str]] = {}
    for name, path in paths.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(path.read_text(), str(path))
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f) if n is not f}
        targets: set[str] = set()
        for node in ast.walk(tree):
            found: set[str] = set()
            if isinstance(node, ast.Import):
                found = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                found = {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names}
            found = {f for f in found if f == package or f.startswith(package + ".")}
            targets |= found
            if found and id(node) in in_function:
                inside.setdefault(name, []).extend(sorted(found))
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph, inside


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports in ``graph`` (``[a, b, …, a]``), or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (found := visit(nxt)):
                return found
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (found := visit(start)):
            return found
    return None


ENGINE_GRAPH, ENGINE_INSIDE = engine_imports(ROOT, "attnbench")


def test_no_import_circle_in_the_engine():
    cycle = import_cycle(ENGINE_GRAPH)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_no_engine_import_inside_a_function():
    """Imports of ``attnbench`` modules stand at the top of a module, where a reader sees them; an
    import inside a function is how a circle hides."""
    assert not ENGINE_INSIDE, f"attnbench imports inside functions: {ENGINE_INSIDE}"


def test_a_planted_circle_is_caught(tmp_path):
    pkg = tmp_path / "planted"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from planted.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def late():\n    from .. import a\n    return a\n")
    graph, inside = engine_imports(tmp_path, "planted")
    assert import_cycle(graph) == ["planted.a", "planted.sub.b", "planted.a"]
    assert inside == {"planted.sub.b": ["planted.a"]}
    (pkg / "sub" / "b.py").write_text("import json\n")  # the circle broken: nothing to report
    graph, _ = engine_imports(tmp_path, "planted")
    assert import_cycle(graph) is None


LAYERS = {  # a package's imports of the engine: none of these rooms (what flows one way)
    "attnbench.results": ("attnbench.plots", "attnbench.report", "attnbench.sweeps", "attnbench.cli",
                          "attnbench.measure"),
    "attnbench.plots": ("attnbench.report", "attnbench.sweeps", "attnbench.cli", "attnbench.measure"),
    "attnbench.measure": ("attnbench.plots", "attnbench.report", "attnbench.sweeps", "attnbench.cli"),
    "attnbench.sweeps": ("attnbench.report", "attnbench.cli"),
    "attnbench.report": ("attnbench.cli",),
}


@pytest.mark.parametrize("room", sorted(LAYERS))
def test_imports_flow_one_way(room):
    wrong = {m: sorted(t for t in targets if t.startswith(LAYERS[room]))
             for m, targets in ENGINE_GRAPH.items() if m == room or m.startswith(room + ".")}
    wrong = {m: t for m, t in wrong.items() if t}
    assert not wrong, f"{room} imports a room above it: {wrong}"


SWEEP_KINDS = {"kernel": "KernelFolder", "accuracy": "AccuracyFolder", "resolution": "ProbeFolder"}
# what the shared base (attnbench.sweeps.base) does for every kind: no kind's module does it again
SCAFFOLDING = [re.compile(rf"(?<![.\w]){name}\(") for name in (
    "foreign_run", "append_rows?", "write_meta", "run_context", "keeping", "command_with",
    "stamp(?:ed)?")] + [
    re.compile(rf"^(def {name}\b|{name} = )", re.M) for name in (
        "parse_seq", "parse_mechanisms", "resume_command", "MAX_N", "BASELINES", "seed_stats")]


@pytest.mark.parametrize("kind", sorted(SWEEP_KINDS))
def test_each_sweep_kind_lives_in_sweeps_on_the_shared_base(kind):
    module = importlib.import_module(f"attnbench.sweeps.{kind}")
    folder = getattr(module, SWEEP_KINDS[kind])
    assert issubclass(folder, SweepFolder) and folder.__module__ == module.__name__
    source = Path(module.__file__).read_text()
    again = [s.pattern for s in SCAFFOLDING if s.search(source)]
    assert not again, f"{module.__name__} does again what attnbench.sweeps.base does: {again}"
