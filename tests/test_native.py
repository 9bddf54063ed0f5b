"""attnbench.native: C kernels compiled once into a cache, and a one-line reason when they cannot be."""

from __future__ import annotations

import ctypes
import multiprocessing

import pytest

from attnbench import native

SOURCE = "int twice(int x) { return 2 * x; }\n"


def fresh_source(tmp_path, text=SOURCE, name="twice.c"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    native._build.cache_clear()
    yield
    native._build.cache_clear()


def test_a_source_is_compiled_once_and_loaded(tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    lib = native.load(fresh_source(tmp_path))
    lib.twice.argtypes, lib.twice.restype = [ctypes.c_int], ctypes.c_int
    assert lib.twice(21) == 42
    built = list((tmp_path / "cache" / "native").glob("twice-*.so"))
    assert len(built) == 1
    native._build.cache_clear()
    native.load(fresh_source(tmp_path))  # the cached library, not a second build
    assert list((tmp_path / "cache" / "native").glob("*.so")) == built  # no temporary file left


def test_a_changed_source_gets_its_own_library(tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    native.load(fresh_source(tmp_path))
    native._build.cache_clear()
    native.load(fresh_source(tmp_path, SOURCE.replace("2 *", "3 *")))
    assert len(list((tmp_path / "cache" / "native").glob("twice-*.so"))) == 2


def test_a_compile_error_is_one_line_naming_the_file_and_is_not_retried(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    builds = []
    real = native._compile
    monkeypatch.setattr(native, "_compile", lambda *a: builds.append(1) or real(*a))
    broken = fresh_source(tmp_path, "int broken( {\n", "broken.c")
    with pytest.raises(native.NativeUnavailable, match=r"compiling broken\.c failed") as info:
        native.load(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(native.NativeUnavailable, match=r"compiling broken\.c failed"):
        native.load(broken)  # the failure is remembered: every layer of every forward asks
    assert builds == [1]


def test_no_compiler_and_switched_off_are_reasons_not_crashes(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        native.load(fresh_source(tmp_path))
    native._build.cache_clear()
    monkeypatch.setenv("ATTNBENCH_NATIVE", "0")
    with pytest.raises(native.NativeUnavailable, match="ATTNBENCH_NATIVE=0"):
        native.load(fresh_source(tmp_path))


def _load_in_child(path: str, queue) -> None:
    native._build.cache_clear()
    lib = native.load(path)
    lib.twice.argtypes, lib.twice.restype = [ctypes.c_int], ctypes.c_int
    queue.put(lib.twice(4))


def test_processes_building_at_once_all_load_a_whole_library(tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    path = str(fresh_source(tmp_path))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(path, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [8, 8, 8]
    assert len(list((tmp_path / "cache" / "native").glob("twice-*.so"))) == 1
