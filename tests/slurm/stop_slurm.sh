#!/usr/bin/env bash
# Stop the single-node test Slurm started by start_slurm.sh: cancel its jobs, then stop slurmd,
# slurmctld (and munged, when start_slurm.sh started it) by their pid files. Safe to run twice.
set -uo pipefail

STATE=${LEVO_SLURM_STATE:-/tmp/levo-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# levo-train test cluster (tests/slurm/start_slurm.sh)"
export PATH=$PATH:/usr/sbin

log() { echo "stop_slurm: $*" >&2; }

stop_pidfile() {  # name pidfile
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop in 10 s; killing it"
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$pidfile"
}

if [[ ! -d $STATE ]]; then
    log "no state folder $STATE: nothing to stop"
    exit 0
fi

# our cluster only: cancel what is still queued or running so no job step outlives the daemons
if [[ -f $CONF ]] && grep -qxF "$MARKER" "$CONF" && [[ -s $STATE/slurmctld.pid ]] \
    && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    jobs=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        log "cancelling jobs $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 30); do [[ -z $(squeue -h -o '%i' 2>/dev/null) ]] && break; sleep 0.5; done
    fi
fi

stop_pidfile slurmd "$STATE/slurmd.pid"
stop_pidfile slurmctld "$STATE/slurmctld.pid"
if [[ -f $STATE/munged.started ]]; then
    stop_pidfile munged /run/munge/munged.pid
    rm -f "$STATE/munged.started"
fi
log "stopped"
