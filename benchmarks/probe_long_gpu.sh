#!/usr/bin/env bash
# Long-context probes on one GPU, one process per scenario side by side, then one merged report.
# A 16K scenario trains for ~4 minutes with the shipped steps, and the tiny probe models leave the GPU
# mostly idle, so the three scenarios run at once (2026-12-02-probes-long-2.md: three 16K processes
# shared one H200 in ~5.6 minutes). At 64K the dense phases load the GPU: run one scenario per call.
#   bash benchmarks/probe_long_gpu.sh long_16k /tmp/p16                         # all three scenarios
#   SCENARIOS=action_history bash benchmarks/probe_long_gpu.sh long_64k /tmp/p64  # one scenario
#   bash benchmarks/probe_long_gpu.sh long_16k /tmp/p16 seeds=[1] train.steps=600  # Hydra overrides
# The merged report: OUT_DIR/merged/probe_report.md; each process's own run: OUT_DIR/<scenario>/.
set -u
if [ $# -lt 2 ]; then
  echo "usage: [SCENARIOS='a b'] bash benchmarks/probe_long_gpu.sh PROBE_CONFIG OUT_DIR [hydra overrides...]" >&2
  exit 2
fi
config=$1 out=$2
shift 2
all="rare_event exogenous_delay action_history"
scenarios=${SCENARIOS:-$all}
for s in $scenarios; do
  case " $all " in *" $s "*) ;; *) echo "unknown scenario '$s'; choose from: $all" >&2; exit 2;; esac
done
mkdir -p "$out"
pids=() dirs=()
for s in $scenarios; do
  drop=()
  for o in $all; do [ "$o" != "$s" ] && drop+=("~probe.scenarios.$o"); done
  tsfm-msa probe "probe=$config" "${drop[@]}" "$@" "hydra.run.dir=$out/$s" > "$out/$s.log" 2>&1 &
  pids+=($!) dirs+=("$out/$s")
  echo "[probe_long_gpu] $s: log $out/$s.log"
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "[probe_long_gpu] ${dirs[$i]} failed: see ${dirs[$i]}.log" >&2; failed=1; }
done
# Runs stopped early still wrote the scenarios they finished; merge whatever reports exist.
have=()
for d in "${dirs[@]}"; do [ -f "$d/probe_summary.json" ] && have+=("$d"); done
[ ${#have[@]} -gt 0 ] && python -m tsfm_msa.probes.merge "$out/merged" "${have[@]}"
exit $failed
