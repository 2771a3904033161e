#!/usr/bin/env bash
# Create .venv with the tested, locked package set (requirements.lock) and install this
# project into it. Safe to run again: an up-to-date environment is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing requirements.lock (the first time: a few minutes, torch is large)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "setup: ready (.venv: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
