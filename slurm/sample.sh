#!/usr/bin/env bash
# Offline candidates for DPO: sample N songs per prompt on every GPU, then score them — on Slurm,
# requeued on preemption/time limit (sampling resumes where it stopped).
#
#   sbatch [sbatch options] slurm/sample.sh --model EXPORT --prompts P --per-prompt N --out DIR \
#          [--scorer SPEC [--score-out DIR2] [--score-batch-size B]] [other levo-data sample options]
#   e.g. sbatch slurm/sample.sh --model runs/levo-sft-1234/export --prompts prompts.jsonl \
#          --per-prompt 8 --out cands --scorer rm:runs/levo-reward-99/export
#   CPU: sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/sample.sh --device cpu ...
#
# Step 1: srun levo-data sample ... — one task per GPU; each task reads its rank from SLURM_PROCID /
#         SLURM_NTASKS, takes prompts i % ntasks == rank and writes DIR/rank<r>-<n>.tar chunk by chunk
#         (a requeued or resubmitted job skips finished chunks; other settings are refused).
# Step 2 (with --scorer): srun -n1 levo-data score --scorer SPEC DIR --out DIR2 (default DIR-scored),
#         resumable per shard. Then: levo-data pairs --candidates DIR2 --out PAIRS --dimension <overall key>.
# Logs go to DIR/logs/slurm-<job id>.out. Environment knobs: LEVO_DATA (the command, default
# `levo-data`, else `python -m levo_data`), LEVO_SRUN_ARGS (extra srun options).
#SBATCH --job-name=levo-sample
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "submit with: sbatch slurm/sample.sh --model EXPORT --prompts P --per-prompt N --out DIR [--scorer SPEC]" >&2
    exit 2
fi
# sbatch runs a spooled copy of this file: find common.sh beside the submitted one
script=$(scontrol show job -o "$SLURM_JOB_ID" | sed -nE 's/.* Command=([^ ]+).*/\1/p')
[[ $script == /* ]] || script=$SLURM_SUBMIT_DIR/$script
# shellcheck source=slurm/common.sh
source "${LEVO_SLURM_SCRIPTS:-$(dirname "$script")}/common.sh"

# split the arguments: --scorer/--score-out/--score-batch-size are for step 2, the rest for step 1
sample_args=() out="" scorer="" score_out="" score_bs=64
while (($#)); do
    case $1 in
        --scorer) scorer=$2; shift 2 ;;
        --scorer=*) scorer=${1#*=}; shift ;;
        --score-out) score_out=$2; shift 2 ;;
        --score-out=*) score_out=${1#*=}; shift ;;
        --score-batch-size) score_bs=$2; shift 2 ;;
        --score-batch-size=*) score_bs=${1#*=}; shift ;;
        --out) out=$2; sample_args+=("$1" "$2"); shift 2 ;;
        --out=*) out=${1#*=}; sample_args+=("$1"); shift ;;
        *) sample_args+=("$1"); shift ;;
    esac
done
if [[ -z $out ]]; then
    echo "levo-sample: --out DIR is required" >&2
    exit 2
fi
score_out=${score_out:-${out%/}-scored}

mkdir -p "$out/logs"
log_file="$out/logs/slurm-${SLURM_JOB_ID}.out"
levo_log "job $SLURM_JOB_ID (sample): logs in $log_file"
exec >>"$log_file" 2>&1

if [[ -n ${LEVO_DATA:-} ]]; then
    read -r -a cmd <<<"$LEVO_DATA"
elif command -v levo-data >/dev/null; then
    cmd=(levo-data)
else
    cmd=(python -m levo_data)
fi
srun_args=(--kill-on-bad-exit=1 --label)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
if [[ -n ${LEVO_SRUN_ARGS:-} ]]; then
    read -r -a extra <<<"$LEVO_SRUN_ARGS"
    srun_args+=("${extra[@]}")
fi
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

levo_log "job $SLURM_JOB_ID start #$((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST:-?}:" \
    "${SLURM_NTASKS:-1} task(s), GPUs/node ${SLURM_GPUS_PER_NODE:-0}"
levo_log "srun ${srun_args[*]} ${cmd[*]} sample ${sample_args[*]}"
rc=0
srun "${srun_args[@]}" "${cmd[@]}" sample "${sample_args[@]}" || rc=$?
levo_log "job $SLURM_JOB_ID: sampling exited with $rc"
if ((rc != 0)); then exit "$rc"; fi
if [[ ! -f $out/done.json ]]; then
    levo_log "job $SLURM_JOB_ID: $out/done.json is missing (not every prompt was sampled); not scoring"
    exit 1
fi
if [[ -z $scorer ]]; then
    levo_log "no --scorer given: candidates in $out are unscored (levo-data score --scorer SPEC $out)"
    exit 0
fi
levo_log "srun -n1 ${cmd[*]} score --scorer $scorer $out --out $score_out"
srun "${srun_args[@]}" -n1 -N1 "${cmd[@]}" score --scorer "$scorer" "$out" --out "$score_out" \
    --batch-size "$score_bs" || rc=$?
levo_log "job $SLURM_JOB_ID: scoring exited with $rc"
exit "$rc"
