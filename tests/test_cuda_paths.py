"""The CUDA half, as far as a CPU can check it: why xformers cannot load and what fixes it, the
tasks' mixed precision (``--amp``), and every mechanism in the dtypes it declares.

What needs a GPU runs where torch sees one and is skipped, with the reason, everywhere else.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from attnbench import build_mechanism, get_mechanism, mechanism_names
from mechanisms import xformers_mea
from mechanisms.xformers_mea import FIX, XFormersBuild, diagnose, parse_build_info, parse_load_failure
from tests.conftest import mechanism_params

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch sees none on this machine")

# xformers 0.0.35's own words when its extension does not load beside torch 2.14.1 (the test log)
LOAD_FAILURE = """xFormers can't load C++/CUDA extensions. xFormers was built for:
    PyTorch 2.10.0+cu128 with CUDA 1208 (you have 2.14.1+cu130)
    Python  3.10.19 (you have 3.11.7)
  Please reinstall xformers (see https://github.com/facebookresearch/xformers#installing-xformers)
  Memory-efficient attention, SwiGLU, sparse and more won't be available."""


def cuda_pins() -> dict[str, str]:
    lines = [ln.strip() for ln in (ROOT / "requirements-cuda.txt").read_text().splitlines()]
    return dict(ln.split("==") for ln in lines if ln and not ln.startswith("#"))


# ---- what xformers says of its build ------------------------------------------------------------
@pytest.mark.parametrize("code,text", [(1208, "12.8"), ("1208", "12.8"), (1108, "11.8"), (12080, "12.8"),
                                       (13000, "13.0"), ("12.8", "12.8"), (None, None), (True, None),
                                       ("cuda", None), ("", None)])
def test_cuda_codes_read_as_versions(code, text):
    assert xformers_mea.cuda_text(code) == text


@pytest.mark.parametrize("version,release", [
    ("2.10.0+cu128", "2.10.0"), ("2.14.1", "2.14.1"), ("2.15.0.dev20260101+cu130", "2.15.0"),
    ("2.10.0a0+git12ab", "2.10.0"), ("v2.9.1", "2.9.1")])
def test_release_drops_local_and_pre_release_parts(version, release):
    assert xformers_mea.release(version) == release


def test_build_info_is_parsed_from_cpp_lib_json():
    meta = {"version": {"cuda": 1208, "hip": None, "torch": "2.10.0+cu128", "python": "3.10.19"},
            "env": {"TORCH_CUDA_ARCH_LIST": "7.5 8.0+PTX 8.0 9.0a"}}
    assert parse_build_info(meta) == ("2.10.0+cu128", "12.8")
    assert parse_build_info(json.loads(json.dumps(meta))) == ("2.10.0+cu128", "12.8")


@pytest.mark.parametrize("meta", [None, [], "text", {}, {"version": "2.10"}, {"version": {}},
                                  {"version": {"torch": 210, "cuda": "x"}}, {"version": {"torch": "  "}}])
def test_unreadable_build_info_gives_nothing(meta):
    assert parse_build_info(meta) == (None, None)


def test_the_load_failure_text_is_parsed_on_one_line_or_several():
    expected = ("2.10.0+cu128", "12.8", "2.14.1+cu130")
    assert parse_load_failure(LOAD_FAILURE) == expected
    assert parse_load_failure(" ".join(LOAD_FAILURE.split())) == expected
    assert parse_load_failure("xFormers was built for a different version of PyTorch or Python.") == (
        None, None, None)
    assert parse_load_failure("") == (None, None, None)


# ---- the reason `attnbench list` gives ------------------------------------------------------------
BUILD = XFormersBuild("0.0.35", "2.10.0+cu128", "12.8")


def test_a_torch_mismatch_names_both_torches_and_the_fix_without_importing():
    def load(_):
        raise AssertionError("a release mismatch is decided from the files alone")

    reason = diagnose(BUILD, "2.14.1+cu130", "13.0", load=load)
    assert "xformers 0.0.35 was built for torch 2.10.0+cu128 (CUDA 12.8)" in reason
    assert "torch 2.14.1+cu130 (CUDA 13.0) is installed" in reason
    assert f"`{FIX}`" in reason and "\n" not in reason


def test_a_matching_torch_lets_xformers_decide():
    assert diagnose(BUILD, "2.10.0+cu128", "12.8", load=lambda build: None) is None
    assert diagnose(BUILD, "2.10.0", None, load=lambda build: "its words") == "its words"
    # no build info in the files (a source build): xformers decides whatever the torch
    assert diagnose(XFormersBuild("0.0.36"), "2.14.1", None, load=lambda build: None) is None


def test_a_missing_xformers_names_the_fix():
    reason = diagnose(None, "2.14.1+cu130", "13.0")
    assert "not installed" in reason and FIX in reason


def test_the_cpu_reason_also_names_the_mismatch(monkeypatch):
    monkeypatch.setattr(xformers_mea, "installed_build", lambda: BUILD)
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    reason = xformers_mea.XFormersAttention.unavailable_reason("cpu")
    assert reason.startswith("xformers.ops.memory_efficient_attention runs on CUDA GPUs only, not on cpu; ")
    assert "2.10.0+cu128" in reason and "2.14.1+cu130 (CUDA" in reason and FIX in reason
    monkeypatch.setattr(torch, "__version__", "2.10.0+cu128")
    assert xformers_mea.XFormersAttention.unavailable_reason("cpu") == (
        "xformers.ops.memory_efficient_attention runs on CUDA GPUs only, not on cpu")


def test_on_a_cuda_machine_matching_versions_make_xformers_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(xformers_mea, "xformers_problem", lambda: None)
    assert xformers_mea.XFormersAttention.unavailable_reason("cuda") is None
    monkeypatch.setattr(xformers_mea, "xformers_problem", lambda: diagnose(BUILD, "2.14.1+cu130", "13.0"))
    reason = xformers_mea.XFormersAttention.unavailable_reason("cuda")
    assert reason.startswith("xformers 0.0.35 was built for torch 2.10.0+cu128") and FIX in reason


def test_attnbench_list_shows_the_reason(monkeypatch, capsys):
    if "xformers" not in mechanism_names():
        pytest.skip("xformers is not registered (attnbench's entry points are not installed)")
    from attnbench.cli import main

    monkeypatch.setattr(xformers_mea, "installed_build", lambda: BUILD)
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    assert main(["list"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("xformers "))  # the table
    assert " no " in row and "built for torch 2.10.0+cu128" in row and FIX in row


# ---- a stand-in xformers package: the files read, and the import path ------------------------------
@pytest.fixture
def fake_xformers(tmp_path, monkeypatch):
    """Write an ``xformers`` package under tmp_path and put it first on sys.path; the real
    xformers modules (if imported) are set aside and restored afterwards."""
    saved = {k: v for k, v in sys.modules.items() if k == "xformers" or k.startswith("xformers.")}
    for k in saved:
        del sys.modules[k]
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(version="0.0.99", build=None, loads=True, failure=""):
        pkg = tmp_path / "xformers"
        pkg.mkdir(exist_ok=True)
        (pkg / "version.py").write_text(f'__version__ = "{version}"\n')
        if build is not None:
            (pkg / "cpp_lib.json").write_text(build if isinstance(build, str) else json.dumps(build))
        (pkg / "_cpp_lib.py").write_text(f"_cpp_library_load_exception = None if {loads} else "
                                         f"RuntimeError({failure!r})\n")
        (pkg / "__init__.py").write_text("import logging\nfrom . import _cpp_lib\n"
                                         "logging.getLogger('xformers').warning('WARNING[XFORMERS]: noise')\n"
                                         "_has_cpp_library = _cpp_lib._cpp_library_load_exception is None\n")
        importlib.invalidate_caches()
        return pkg

    yield write
    for k in [k for k in sys.modules if k == "xformers" or k.startswith("xformers.")]:
        del sys.modules[k]
    sys.modules.update(saved)
    importlib.invalidate_caches()


def test_the_build_is_read_from_the_installed_files(fake_xformers):
    fake_xformers(build={"version": {"torch": "2.10.0+cu128", "cuda": 1208}})
    assert xformers_mea.installed_build() == XFormersBuild("0.0.99", "2.10.0+cu128", "12.8")
    assert "xformers" not in sys.modules  # read, not imported
    fake_xformers(build="{not json")
    assert xformers_mea.installed_build() == XFormersBuild("0.0.99", None, None)


def test_an_extension_that_does_not_load_is_explained_in_one_quiet_line(fake_xformers, capsys):
    fake_xformers(build=None, loads=False, failure=LOAD_FAILURE)
    build = xformers_mea.installed_build()
    reason = xformers_mea._import_problem(build)
    assert "built for torch 2.10.0+cu128 (CUDA 12.8), but torch 2.14.1+cu130" in reason and FIX in reason
    assert "noise" not in capsys.readouterr().err  # xformers' warning is replaced by the reason


def test_an_extension_that_loads_is_no_problem_and_other_failures_are_quoted(fake_xformers):
    fake_xformers(loads=True)
    assert xformers_mea._import_problem(xformers_mea.installed_build()) is None
    for k in [k for k in sys.modules if k.startswith("xformers")]:
        del sys.modules[k]
    fake_xformers(loads=False, failure="undefined symbol: _ZN3c10")
    reason = xformers_mea._import_problem(xformers_mea.installed_build())
    assert reason == f"xformers 0.0.99: undefined symbol: _ZN3c10; try `{FIX}`"


def test_the_installed_xformers_was_built_for_the_pinned_cuda_torch():
    """The evidence behind requirements-cuda.txt, wherever that xformers release is installed."""
    build = xformers_mea.installed_build()
    pins = cuda_pins()
    if build is None or build.version != pins["xformers"]:
        pytest.skip(f"xformers {pins['xformers']} is not installed here")
    assert build.torch is not None and xformers_mea.release(build.torch) == pins["torch"]


@needs_cuda
def test_xformers_loads_on_this_gpu_when_the_versions_match():
    build = xformers_mea.installed_build()
    if build is None or build.torch is None or xformers_mea.release(build.torch) != xformers_mea.release(
            torch.__version__):
        pytest.skip(f"this environment is not the CUDA set (run `{FIX}`)")
    assert xformers_mea.xformers_problem() is None
    assert get_mechanism("xformers").unavailable_reason("cuda") is None


# ---- the tasks' mixed precision (--amp) -----------------------------------------------------------
def _amp_dtype():
    """The tasks' --amp resolver, wherever the training harness keeps it."""
    for module in ("tasks.common.trainer", "tasks.common.harness", "tasks._training"):
        try:
            found = getattr(importlib.import_module(module), "amp_dtype", None)
        except ImportError:
            continue
        if found is not None:
            return found
    pytest.skip("the training harness's amp_dtype was not found")


def test_amp_on_the_cpu():
    amp_dtype = _amp_dtype()
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None  # CPU autocast is opt-in
    assert amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(Exception, match="--amp fp16 needs CUDA"):
        amp_dtype("fp16", cpu)


def test_amp_auto_on_cuda_is_bf16_where_the_gpu_has_it(monkeypatch):
    amp_dtype = _amp_dtype()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert amp_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert amp_dtype("fp16", torch.device("cuda")) is torch.float16
    assert amp_dtype("off", torch.device("cuda")) is None


def test_amp_auto_on_cuda_is_fp16_where_bf16_is_only_emulated(monkeypatch):
    amp_dtype = _amp_dtype()
    # a V100: bf16 tensors can be made (emulated), the hardware has no bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype("auto", torch.device("cuda")) is torch.float16


# ---- every mechanism in the dtypes it declares, and under the tasks' autocast ------------------------
DIM, HEADS, GRID = 32, 4, (4, 5)
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def half_dtypes(name: str) -> list[torch.dtype]:
    return [d for d in get_mechanism(name).dtypes if d in TOLERANCE]


def reference_and_input(name: str, device: str):
    torch.manual_seed(0)
    ref = build_mechanism(name, DIM, HEADS).to(device)
    x = torch.randn(2, GRID[0] * GRID[1], DIM, device=device)
    return ref, x, ref(x, GRID).detach()


def check_half(name: str, device: str) -> None:
    """The mechanism cast to each half dtype it declares agrees with float32, forward and backward."""
    for dtype in half_dtypes(name):
        ref, x, expected = reference_and_input(name, device)
        m = build_mechanism(name, DIM, HEADS).to(device)
        m.load_state_dict(ref.state_dict())
        m = m.to(dtype)
        xh = x.to(dtype).requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            y = m(xh, GRID)
        assert y.dtype == dtype, f"{name} in {dtype} returned {y.dtype}"
        torch.testing.assert_close(y.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
        y.float().square().sum().backward()
        assert torch.isfinite(xh.grad).all()


def check_autocast(name: str, device: str, dtype: torch.dtype) -> None:
    """float32 weights under autocast, as the tasks train with --amp: finite, close, with gradients."""
    ref, x, expected = reference_and_input(name, device)
    x = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with torch.autocast(torch.device(device).type, dtype=dtype):
            y = ref(x, GRID)
    torch.testing.assert_close(y.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    y.float().square().sum().backward()
    grads = [p.grad for p in ref.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}: a gradient is missing"


@pytest.mark.parametrize("name", mechanism_params())
def test_every_declared_half_dtype_runs_on_the_cpu(name):
    check_half(name, "cpu")


@pytest.mark.parametrize("name", mechanism_params())
def test_bf16_autocast_on_the_cpu_as_the_tasks_run_it(name):
    check_autocast(name, "cpu", torch.bfloat16)


def cuda_params() -> list:
    params = []
    for name in mechanism_names():
        reason = get_mechanism(name).unavailable_reason("cuda")
        marks = [pytest.mark.skip(reason=f"{name} on cuda: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@needs_cuda
@pytest.mark.parametrize("name", cuda_params())
def test_every_declared_half_dtype_runs_on_cuda(name):
    check_half(name, "cuda")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", cuda_params())
def test_autocast_on_cuda_as_the_tasks_run_it(name, dtype):
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    check_autocast(name, "cuda", dtype)
