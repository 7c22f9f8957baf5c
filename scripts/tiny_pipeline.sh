#!/usr/bin/env bash
# The miniature pipeline end to end on the tiny default (CPU, no download): stage 1, stage 2 from it, then
# `covipal.eval` of no pruning, FastV and CoViPAL (the stage-1 and the stage-2 PPM) at r = 0.5 and 0.25 on the
# tiny world's four benchmarks through VLMEvalKit, and the table of that sweep (`covipal.report`).
# The first run also pretrains the tiny model (cached afterwards). Extra arguments go to both training runs.
#   bash scripts/tiny_pipeline.sh          RUN=outputs/pipeline/mine QUESTIONS=200 bash scripts/tiny_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
RUN="${RUN:-outputs/pipeline/$(date +%Y-%m-%d_%H-%M-%S)}"
QUESTIONS="${QUESTIONS:-500}"
"$PY" -m covipal.train stage=1 "hydra.run.dir=$RUN/stage1" "$@"
"$PY" -m covipal.train stage=2 "stage2.init=$RUN/stage1/final" "hydra.run.dir=$RUN/stage2" "$@"
EVAL=(num_samples="$QUESTIONS" "hydra.sweep.dir=$RUN/eval")
"$PY" -m covipal.eval -m pruner=none "${EVAL[@]}"
"$PY" -m covipal.eval -m pruner=fastv pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}"
"$PY" -m covipal.eval -m pruner=covipal label=covipal_stage1 "classifier=$RUN/stage1/final" \
    pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}"
"$PY" -m covipal.eval -m pruner=covipal label=covipal "classifier=$RUN/stage2/final" \
    pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}"
"$PY" -m covipal.report "$RUN/eval"
echo "pipeline outputs in $RUN"
