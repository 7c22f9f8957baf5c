#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install covipal with its test tools.
#   VENV=.venv (default)   EXTRAS=dev (default; add ",flash" on a CUDA machine)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torchvision is needed by transformers' video processor; these two builds are known to work together.
"$VENV/bin/python" -m pip install --quiet torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
echo "covipal installed in $VENV"
