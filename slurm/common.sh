# shellcheck shell=bash
# Shared logic of the sbatch scripts (slurm/pretrain.sh, sft.sh, dpo.sh); sourced, not run.
#
#   sbatch [sbatch options] slurm/RECIPE.sh [hydra overrides]
#
# What levo_slurm_run RECIPE "$@" does inside the allocation:
#  * run_dir: the user's run_dir=... if given, else $LEVO_RUNS/<job name>-<job id> (LEVO_RUNS
#    defaults to runs/, relative to the submit folder). It is stable across requeues.
#  * logs: everything after the first line goes to RUN_DIR/logs/slurm-<job id>.out (appended
#    across requeues; task lines prefixed by their rank); the sbatch --output file in the submit
#    folder only says where to look (and shows errors from before the run folder exists).
#  * launch: srun levo-train recipe=RECIPE run_dir=RUN_DIR trainer.num_nodes=<nodes>
#    trainer.devices=<tasks per node> resume=true "$@" — one task per device. Later overrides
#    win, so "$@" can change anything (trainer.accelerator=cpu trainer.strategy=ddp for CPU).
#  * preemption / time limit: the scripts ask for --signal=USR1@120 (to the job steps, i.e. every
#    rank) and --requeue. levo-train answers USR1 (under srun it detects Slurm) by writing
#    RUN_DIR/hpc_ckpt_N.ckpt at the next optimizer step on all ranks and `scontrol requeue`
#    (Lightning's SLURMEnvironment auto-requeue does the same, but from inside the signal handler).
#    The requeued job keeps its id, so it finds the same run_dir, and levo-train's resume=true
#    continues from the run folder's newest checkpoint that loads (highest step among
#    RUN_DIR/hpc_ckpt_N.ckpt and RUN_DIR/checkpoints/{last,step*}.ckpt); once the run folder has
#    checkpoints, a ckpt_path=... the run was started from is no longer used, so a requeue never
#    goes back to it. A manual preemption test: scancel --signal=USR1 JOBID.
#
# Host memory: the scripts ask for --mem=0, the whole node's memory (the job takes every GPU of its
# nodes). What a node needs: under strategy=fsdp2 (meta-device init) rank 0 maps model.init (an fp32
# v2-large export: 20 GB; the released bf16 model: 10 GB) and every rank holds its shards plus one
# full tensor (1.2 GB) while the model is built; under ddp every rank builds the whole model on the
# host first (8 x 20 GB for v2-large in fp32). Pass --mem=NG to sbatch to ask for less.
#
# Environment knobs: LEVO_TRAIN (the command, default `levo-train`, else `python -m
# levo_train.cli`), LEVO_RUNS (runs root), LEVO_SRUN_ARGS (extra srun options).

levo_log() { echo "[levo-slurm $(date '+%F %T')] $*"; }

levo_slurm_run() {
    local recipe=$1
    shift
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        echo "levo-slurm: not inside a Slurm job; submit with: sbatch slurm/$recipe.sh [overrides]" >&2
        return 2
    fi

    # run folder: the user's run_dir=... wins (the last one, as hydra takes it)
    local run_dir="" a
    for a in "$@"; do [[ $a == run_dir=* ]] && run_dir=${a#run_dir=}; done
    run_dir=${run_dir:-${LEVO_RUNS:-runs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
    mkdir -p "$run_dir/logs"
    local log_file="$run_dir/logs/slurm-${SLURM_JOB_ID}.out"
    levo_log "job $SLURM_JOB_ID ($recipe): logs in $log_file"
    exec >>"$log_file" 2>&1

    # one task per device: devices = tasks per node, num_nodes = nodes of the allocation
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local per_node=${SLURM_NTASKS_PER_NODE:-}
    if [[ -z $per_node ]]; then per_node=$((${SLURM_NTASKS:-1} / nodes)); fi
    per_node=${per_node%%(*}  # "8(x2)" form, should a Slurm version print it

    local cmd
    if [[ -n ${LEVO_TRAIN:-} ]]; then
        read -r -a cmd <<<"$LEVO_TRAIN"
    elif command -v levo-train >/dev/null; then
        cmd=(levo-train)
    else
        cmd=(python -m levo_train.cli)
    fi

    local srun_args=(--kill-on-bad-exit=1 --label)
    # since Slurm 22.05 srun does not inherit --cpus-per-task from sbatch
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
    if [[ -n ${LEVO_SRUN_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$LEVO_SRUN_ARGS"
        srun_args+=("${extra[@]}")
    fi

    export PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

    local full=("${cmd[@]}" "recipe=$recipe" "run_dir=$run_dir" "trainer.num_nodes=$nodes"
        "trainer.devices=$per_node" resume=true "$@")
    levo_log "job $SLURM_JOB_ID start #$((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST:-?}:" \
        "$nodes node(s) x $per_node task(s), ${SLURM_CPUS_PER_TASK:-1} CPU(s)/task, GPUs/node ${SLURM_GPUS_PER_NODE:-0}"
    levo_log "srun ${srun_args[*]} ${full[*]}"
    local rc=0
    srun "${srun_args[@]}" "${full[@]}" || rc=$?
    levo_log "job $SLURM_JOB_ID: srun exited with $rc"
    return "$rc"
}
