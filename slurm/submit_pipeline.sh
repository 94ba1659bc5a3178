#!/usr/bin/env bash
# The whole pipeline as Slurm jobs chained with --dependency=afterok:
#
#   prepare ──▶ mlm ──▶ head adapted ──┐
#       └────▶ head pretrained ────────┴──▶ [compare seeds, an array] ──▶ compare (writes <out>/comparison.md)
#
#   slurm/submit_pipeline.sh jobs/mtsamples.yaml [key=value ...]      # from the repository root
#
# Every job gets the same spec and overrides; a failed job cancels nothing by itself, its
# dependants stay pending with reason DependencyNeverSatisfied (scancel them). The chain submitted
# again completes: a finished job finds its job.json, logs "up to date" and exits 0 (medclf run
# is the same chain in one process). Environment:
#   SBATCH_ACCOUNT, SBATCH_PARTITION   read by sbatch itself (account/partition of every job)
#   GPUS_PER_NODE=8    GPUs (processes) per node for mlm; heads and compare use one GPU
#   MLM_NODES=1        nodes for mlm (more: slurm/multi_node.sbatch)
#   OUT                output URL of the run (else the spec's `out`)
#   MEDCLF_CPU=1       CPU ranks instead of GPUs (no GPUs requested)
#   SBATCH_EXTRA       more sbatch options for every job, e.g. "--time=04:00:00 --qos=long"
#   COMPARE_TASKS=N    compare's seeds as a Slurm array of N tasks (one per seed, N = compare.seeds),
#                      then the compare job gathers them; 0 (default): one compare job trains every seed
# Prints the job ids, one line per job.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 SPEC [key=value ...]" >&2; exit 2; }
gpus="${GPUS_PER_NODE:-8}"
mlm_nodes="${MLM_NODES:-1}"
if [ "${MEDCLF_CPU:-0}" = 1 ]; then gpu_request=0; small=0; else gpu_request="$gpus"; small=1; fi
read -r -a extra <<< "${SBATCH_EXTRA:-}"

# submit NAME TEMPLATE NODES PROCS_PER_NODE GPUS_PER_NODE AFTER JOB [key=value ...]: prints the job id
submit() {
  local name="$1" template="$2" nodes="$3" procs="$4" gpu="$5" after="$6" job="$7"
  shift 7
  sbatch --parsable --job-name="medclf-$name" --nodes="$nodes" --gpus-per-node="$gpu" \
    ${after:+--dependency=afterok:$after} --export="ALL,JOB=$job,GPUS_PER_NODE=$procs" "${extra[@]}" \
    "$here/$template" "$@"
}

template=single_node.sbatch
[ "$mlm_nodes" -gt 1 ] && template=multi_node.sbatch
# prepare needs no GPU: one CPU process wherever it lands
prepare=$(MEDCLF_CPU=1 submit prepare single_node.sbatch 1 1 0 "" prepare "$@")
mlm=$(submit mlm "$template" "$mlm_nodes" "$gpus" "$gpu_request" "$prepare" mlm "$@")
head_pretrained=$(submit head-pretrained single_node.sbatch 1 1 "$small" "$prepare" head "$@" head.encoder=pretrained)
head_adapted=$(submit head-adapted single_node.sbatch 1 1 "$small" "$mlm" head "$@" head.encoder=adapted)
heads="$head_pretrained:$head_adapted"
tasks="${COMPARE_TASKS:-0}"
if [ "$tasks" -gt 0 ]; then
  seeds=$(extra+=(--array="0-$((tasks - 1))"); submit compare-seeds single_node.sbatch 1 1 "$small" "$heads" compare "$@")
  heads="$seeds"  # the array's id: afterok waits for every task
fi
compare=$(submit compare single_node.sbatch 1 1 "$small" "$heads" compare "$@")
printf 'prepare %s\nmlm %s\nhead-pretrained %s\nhead-adapted %s\n' "$prepare" "$mlm" "$head_pretrained" "$head_adapted"
[ "$tasks" -gt 0 ] && printf 'compare-seeds %s\n' "$seeds"
printf 'compare %s\n' "$compare"
