#!/usr/bin/env bash
# The miniature pipeline end to end on the tiny default (CPU, no download): stage 1, stage 2 from it, then
# tiny-world accuracy of none, FastV and CoViPAL (stage 1 only / after stage 2) at r = 0.5 and 0.25.
# The first run also pretrains the tiny model (cached afterwards). Extra arguments go to both training runs.
#   bash scripts/tiny_pipeline.sh                      RUN=outputs/pipeline/mine bash scripts/tiny_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
RUN="${RUN:-outputs/pipeline/$(date +%Y-%m-%d_%H-%M-%S)}"
QUESTIONS="${QUESTIONS:-500}"
"$PY" -m covipal.train stage=1 "hydra.run.dir=$RUN/stage1" "$@"
"$PY" -m covipal.train stage=2 "stage2.init=$RUN/stage1/final" "hydra.run.dir=$RUN/stage2" "$@"
"$PY" scripts/ppm_report.py --questions "$QUESTIONS" --output "$RUN/report.json" \
    "stage1=$RUN/stage1/final" "stage2=$RUN/stage2/final"
echo "pipeline outputs in $RUN"
