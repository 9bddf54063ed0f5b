"""The rooms and their doors, read from the source: which package may import which, and that
every built-in mechanism and task comes in through its entry point, as a plug-in does."""

from __future__ import annotations

import ast
from importlib import metadata
from pathlib import Path

import pytest

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
