#!/usr/bin/env bash
# Where CoViPAL stands on the tiny world (README, "Where CoViPAL stands"): every stage-1 label mode through stage 1
# and stage 2 with three training seeds, the paper's recipe, stage-2 ablations (k, the paper's P = σ(S), learning
# rate, temperature schedule), stage 2 from a random PPM, and every
# baseline, at r = 0.5 and 0.25 on the four tiny-world benchmarks (QUESTIONS each), then `covipal.report` with
# paired bootstrap intervals. About 3½ hours on 2 CPU cores once the tiny model is cached. Phases can be run alone:
#   bash scripts/tiny_comparison.sh                         # everything
#   PHASES="baselines" bash scripts/tiny_comparison.sh      # one or more of: modes paper ablations baselines report
#   RUN=outputs/comparison/mine QUESTIONS=200 SEEDS=0 bash scripts/tiny_comparison.sh
#   PHASES=ablations VARIANTS="k0.01 sigmoid" bash scripts/tiny_comparison.sh   # some stage-2 ablations only
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
RUN="${RUN:-outputs/comparison/$(date +%Y-%m-%d_%H-%M-%S)}"
QUESTIONS="${QUESTIONS:-1000}"
SEEDS="${SEEDS:-0,1,2}"
PHASES="${PHASES:-modes paper ablations baselines report}"
MODES="${MODES:-literal text_after_visual question last_prompt last}"
BEST="${BEST:-question}"   # the label mode the k ablation uses
VARIANTS="${VARIANTS:-all}"   # the stage-2 ablations to run, by name (k0.01 k0.1 sigmoid sigmoid_lr1e-3 lr1e-3 constant_tau)
SUM_MODES="${SUM_MODES-text_after_visual question last_prompt last}"   # modes whose sum labels the paper phase trains
QUIET=(train.progress=false logger.wandb=disabled)
EVAL=(num_samples="$QUESTIONS" "hydra.sweep.dir=$RUN/eval")
PER_SEED='hydra.sweep.subdir=s${seed}'

stage1() {  # NAME overrides...
  local name=$1; shift
  "$PY" -m covipal.train -m stage=1 seed="$SEEDS" "$@" "hydra.sweep.dir=$RUN/train/$name/stage1" "$PER_SEED" "${QUIET[@]}"
}
stage2() {  # NAME FROM overrides...   (FROM: the stage-1 run name, or "random")
  local name=$1 from=$2; shift 2
  local init="$RUN/train/$from/stage1/s\${seed}/final"
  [ "$from" = random ] && init=random
  "$PY" -m covipal.train -m stage=2 seed="$SEEDS" "stage2.init=$init" "$@" "hydra.sweep.dir=$RUN/train/$name/stage2" \
    "$PER_SEED" "${QUIET[@]}"
}
evaluate() {  # LABEL PPM_DIR RATIOS   (PPM_DIR holds s<seed>/final)
  "$PY" -m covipal.eval -m pruner=covipal "label=$1" "classifier=$2/s\${seed}/final" seed="$SEEDS" \
    pruner.reserve_ratio="$3" "${EVAL[@]}"
}

for phase in $PHASES; do
  case $phase in
  modes)  # each query-row mode (reduce=max over heads and rows) through stage 1 and stage 2 (the default stage 2)
    for mode in $MODES; do
      stage1 "$mode" stage1.query_rows="$mode" stage1.reduce=max
      stage2 "$mode" "$mode"
      evaluate "${mode}_stage1" "$RUN/train/$mode/stage1" 0.5,0.25
      evaluate "${mode}_stage2" "$RUN/train/$mode/stage2" 0.5,0.25
    done ;;
  paper)  # Eq. 3 as written (literal rows, sum) and the paper's P = σ(S), then the same labels with our stage 2;
          # the other modes' sum labels through stage 1 (seed 0)
    stage1 literal_sum stage1.query_rows=literal stage1.reduce=sum
    stage2 literal_sum_sigmoid literal_sum stage2.retention=sigmoid stage2.k=0.01
    stage2 literal_sum literal_sum
    evaluate literal_sum_stage1 "$RUN/train/literal_sum/stage1" 0.5,0.25
    evaluate literal_sum_sigmoid_stage2 "$RUN/train/literal_sum_sigmoid/stage2" 0.5,0.25
    evaluate literal_sum_stage2 "$RUN/train/literal_sum/stage2" 0.5,0.25
    for mode in $SUM_MODES; do
      SEEDS=0 stage1 "${mode}_sum" stage1.query_rows="$mode" stage1.reduce=sum
      SEEDS=0 evaluate "${mode}_sum_stage1" "$RUN/train/${mode}_sum/stage1" 0.25
    done ;;
  ablations)  # stage 2 from the best mode's stage 1: k, the paper's P = σ(S), the old learning rate, no τ schedule;
              # and stage 2 from an untrained PPM
    variants=("k0.01 stage2.k=0.01" "k0.1 stage2.k=0.1" "sigmoid stage2.retention=sigmoid stage2.k=0.01"
              "sigmoid_lr1e-3 stage2.retention=sigmoid stage2.k=0.01 stage2.lr=1e-3" "lr1e-3 stage2.lr=1e-3"
              "constant_tau stage2.final_temperature=null")
    for variant in "${variants[@]}"; do
      read -r name overrides <<< "$variant"
      [[ " $VARIANTS " == *" $name "* || $VARIANTS == all ]] || continue
      # shellcheck disable=SC2086
      stage2 "${BEST}_$name" "$BEST" $overrides
      evaluate "${BEST}_stage2_$name" "$RUN/train/${BEST}_$name/stage2" 0.25
    done
    stage2 random_init random
    evaluate random_init_stage2 "$RUN/train/random_init/stage2" 0.5,0.25 ;;
  baselines)
    "$PY" -m covipal.eval -m pruner=none "${EVAL[@]}"
    "$PY" -m covipal.eval -m pruner=random seed="$SEEDS" pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}"
    "$PY" -m covipal.eval -m pruner=oracle,fastv,pdrop,visionzip,vitcop,pool pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}"
    "$PY" -m covipal.eval -m pruner=sparsevlm pruner.reserve_ratio=0.5,0.3 "${EVAL[@]}"
    "$PY" -m covipal.train -m stage=lora pruner=pdrop pruner.reserve_ratio=0.25 seed="$SEEDS" \
      "hydra.sweep.dir=$RUN/train/pdrop_star" "$PER_SEED" "${QUIET[@]}"
    "$PY" -m covipal.eval -m pruner=pdrop label=pdrop_star "adapter=$RUN/train/pdrop_star/s\${seed}/final" \
      seed="$SEEDS" pruner.reserve_ratio=0.5,0.25 "${EVAL[@]}" ;;
  report)
    "$PY" -m covipal.report "$RUN/eval" ;;
  *) echo "unknown phase $phase (modes paper ablations baselines report)" >&2; exit 2 ;;
  esac
done
echo "comparison outputs in $RUN"
