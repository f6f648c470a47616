#!/usr/bin/env bash
# Semi-online DPO with a reward model, from an SFT or DPO export — on Slurm, one task per GPU, requeued on
# preemption/time limit. Every rank generates its share of each round's prompts; the pairs are gathered.
#
#   sbatch [sbatch options] slurm/sdpo.sh [hydra overrides]
#   e.g. sbatch slurm/sdpo.sh model.init=runs/levo-sft-1234/export reward.ckpt=runs/levo-reward-99/export
#   CPU (DDP over gloo): sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/sdpo.sh \
#                          trainer.accelerator=cpu trainer.strategy=ddp ...
#
# Runs `srun levo-train recipe=sdpo run_dir=runs/<job name>-<job id> trainer.num_nodes=<nodes>
# trainer.devices=<tasks per node> resume=true [overrides]` from the submit folder; logs go to
# RUN_DIR/logs/. --mem=0 asks for the node's whole host memory. Details (requeue, resume, host memory,
# environment knobs): slurm/common.sh.
#SBATCH --job-name=levo-sdpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "submit with: sbatch slurm/sdpo.sh [overrides]" >&2
    exit 2
fi
# sbatch runs a spooled copy of this file: find common.sh beside the submitted one
script=$(scontrol show job -o "$SLURM_JOB_ID" | sed -nE 's/.* Command=([^ ]+).*/\1/p')
[[ $script == /* ]] || script=$SLURM_SUBMIT_DIR/$script
# shellcheck source=slurm/common.sh
source "${LEVO_SLURM_SCRIPTS:-$(dirname "$script")}/common.sh"
levo_slurm_run sdpo "$@"
