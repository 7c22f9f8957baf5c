#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install covipal with its test tools.
#   VENV=.venv (default)   EXTRAS=dev (default: eval, slurm and test tools; add ",flash" on a CUDA machine)
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
# VLMEvalKit (covipal.eval runs through it) without the 6-7 GB its own requirements pull; what it imports comes
# with covipal's `eval` extra (part of `dev`)
"$VENV/bin/python" -m pip install --quiet --no-deps ms-vlmeval==0.0.20
echo "covipal installed in $VENV"
