#!/usr/bin/env bash
# Create .venv with the tested, locked package set (requirements.lock) and install this
# project into it. Safe to run again: an up-to-date environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# The Pythons requirements.lock installs on: numpy, scipy and networkx there need >= 3.11, triton < 3.15
# (pyproject.toml says the same lower bound; tests/test_packaging.py checks they agree).
MIN_PYTHON=3.11
MAX_PYTHON=3.14

# Stop with a clear message, before creating anything, on a Python the lock cannot install.
check_python() {  # $1: the interpreter
  local version
  if ! version=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo "setup: cannot run '$1' (set PYTHON to a Python $MIN_PYTHON to $MAX_PYTHON interpreter)" >&2
    exit 1
  fi
  local major=${version%%.*} minor=${version#*.}
  if (( major != 3 || minor < ${MIN_PYTHON#3.} || minor > ${MAX_PYTHON#3.} )); then
    echo "setup: '$1' is Python $version, but requirements.lock installs on Python $MIN_PYTHON to $MAX_PYTHON only;" \
         "set PYTHON to such an interpreter (e.g. PYTHON=python3.11 scripts/setup.sh)" >&2
    [ -x .venv/bin/python ] && [ "$1" = .venv/bin/python ] && echo "setup: or remove .venv to build it again" >&2
    exit 1
  fi
}

if [ ! -x .venv/bin/python ]; then
  check_python "$PYTHON"
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
check_python .venv/bin/python
echo "setup: installing requirements.lock (the first time: a few minutes, torch is large)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "setup: ready (.venv: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
