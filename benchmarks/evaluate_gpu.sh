#!/usr/bin/env bash
# The evaluation protocol's full re-run on one GPU machine (issue 9): vic_elec, EPF and pedestrian,
# every learned model at the protocol's budget, 3 seeds, one process per (dataset, model) in parallel
# (the models are small: a process keeps one GPU stream busy only a fraction of the time, and the
# machine has 16 cores), then `tsfm_msa.evaluate.collect` over all folders.
#
#   source benchmarks/gpu_setup.sh && bash benchmarks/evaluate_gpu.sh OUT_DIR [STEPS] [DATASETS] [MODELS]
#
# SPLIT_SEEDS="0 1 2" runs one process per (dataset, model, seed) instead, for a short time budget.
# OVERRIDES="optim.lr=4e-3 ..." adds Hydra overrides to every run (a variant of the protocol).
#
# Writes OUT_DIR/runs/<dataset>-<model>/ (each an evaluate run folder, with its log) and
# OUT_DIR/results/<date>-evaluation-*.{md,csv} (the committed form).
set -u
out=${1:?usage: evaluate_gpu.sh OUT_DIR [STEPS] [DATASETS] [MODELS]}
steps=${2:-1000}
datasets=${3:-"vic_elec epf pedestrian"}
models=${4:-"dense msa deepar tft patchtst"}
warmup=$((steps * 3 / 10))  # the quick setting's ratio (100 of 300 steps): dense attention while the indexer learns
mkdir -p "$out/runs" "$out/results"
pids=()
for dataset in $datasets; do
  eval_cfg=quick
  [ -f "configs/eval/$dataset.yaml" ] && eval_cfg=$dataset  # e.g. eval=pedestrian: its context and patch length
  for model in $models; do
    for seed in ${SPLIT_SEEDS:-all}; do
      name="$dataset-$model"
      seeds=()
      if [ "$seed" != all ]; then name="$name-seed$seed"; seeds=("eval.seeds=[$seed]"); fi
      tsfm-msa evaluate data="$dataset" eval="$eval_cfg" trainer=gpu "eval.models=[$model]" \
        eval.max_steps="$steps" indexer_warmup.steps="$warmup" eval.plot_series=1 "${seeds[@]}" ${OVERRIDES:-} \
        hydra.run.dir="$out/runs/$name" > "$out/runs/$name.log" 2>&1 &
      pids+=($!)
    done
  done
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
echo "evaluate_gpu: ${#pids[@]} processes, $failed failed"
done_runs=$(ls -d "$out"/runs/*/ 2>/dev/null | while read -r d; do [ -f "$d/evaluation.json" ] && echo "$d"; done)
python -m tsfm_msa.evaluate.collect "$out/results/$(date -u +%F)" $done_runs
