#!/usr/bin/env bash
# The miniature pipeline end to end on the tiny default (CPU, no download): stage 1, stage 2 from it, PDrop*'s
# LoRA run, then `covipal.eval` of no pruning, CoViPAL (the stage-1 and the stage-2 PPM) and every baseline
# (FastV, PyramidDrop, PDrop*, SparseVLM, VisionZip, ViTCoP, random, pool) at r = 0.5 and 0.25 on the tiny
# world's four benchmarks through VLMEvalKit, and the table of that sweep (`covipal.report`). SparseVLM runs at
# 0.3 instead of 0.25, the lowest average its rule reaches on 4 layers. The first run also pretrains the tiny
# model (cached afterwards). MODEL picks the model of every step (e.g. MODEL=tiny_qwen, the tiny Qwen2.5-VL);
# extra arguments go to the three training runs.
#   bash scripts/tiny_pipeline.sh          RUN=outputs/pipeline/mine QUESTIONS=500 bash scripts/tiny_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
RUN="${RUN:-outputs/pipeline/$(date +%Y-%m-%d_%H-%M-%S)}"
QUESTIONS="${QUESTIONS:-200}"
CHOSEN=()
if [ -n "${MODEL:-}" ]; then CHOSEN=("model=$MODEL"); fi
"$PY" -m covipal.train stage=1 "${CHOSEN[@]}" "hydra.run.dir=$RUN/stage1" "$@"
"$PY" -m covipal.train stage=2 "${CHOSEN[@]}" "stage2.init=$RUN/stage1/final" "hydra.run.dir=$RUN/stage2" "$@"
"$PY" -m covipal.train stage=lora "${CHOSEN[@]}" pruner=pdrop pruner.reserve_ratio=0.25 "hydra.run.dir=$RUN/pdrop_star" "$@"
EVAL=("${CHOSEN[@]}" num_samples="$QUESTIONS" "hydra.sweep.dir=$RUN/eval")
"$PY" -m covipal.eval -m pruner=none "${EVAL[@]}"
"$PY" -m covipal.eval -m pruner=fastv,pdrop,visionzip,vitcop,random,pool pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}"
"$PY" -m covipal.eval -m pruner=sparsevlm pruner.reserve_ratio=0.5,0.3 "${EVAL[@]}"
"$PY" -m covipal.eval -m pruner=pdrop label=pdrop_star "adapter=$RUN/pdrop_star/final" pruner.reserve_ratio=0.5,0.25 \
    "${EVAL[@]}"
"$PY" -m covipal.eval -m pruner=covipal label=covipal_stage1 "classifier=$RUN/stage1/final" \
    pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}"
"$PY" -m covipal.eval -m pruner=covipal label=covipal "classifier=$RUN/stage2/final" \
    pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}"
"$PY" -m covipal.report "$RUN/eval"
echo "pipeline outputs in $RUN"
