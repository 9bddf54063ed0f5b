#!/usr/bin/env bash
# Install attnbench, its dependencies and its test tools into the active Python environment.
# torch goes first: natten builds from source against the installed torch, so the package is
# installed with --no-build-isolation. Safe to run again: installed packages are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "setuptools>=69" wheel
"${pip[@]}" -r requirements-torch.txt
"${pip[@]}" --no-build-isolation -e ".[test]"
