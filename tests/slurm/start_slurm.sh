#!/usr/bin/env bash
# Install (Debian packages) and start a single-node Slurm cluster for the tests. Idempotent: a
# cluster this script started and that still answers is reused. Needs root; no systemd.
#
#   bash tests/slurm/start_slurm.sh        # prints the state folder (last line of stdout)
#   bash tests/slurm/stop_slurm.sh         # stops it again
#
# Environment: LEVO_SLURM_STATE (state/spool/log folder, default /tmp/levo-slurm),
#              LEVO_SLURM_TIMEOUT (seconds to wait for the node to be idle, default 60).
# Writes /etc/slurm/slurm.conf (where sbatch/sinfo look) only when it is absent or one of ours.
set -euo pipefail

STATE=${LEVO_SLURM_STATE:-/tmp/levo-slurm}
TIMEOUT=${LEVO_SLURM_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# levo-train test cluster (tests/slurm/start_slurm.sh)"

log() { echo "start_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

[[ $(id -u) -eq 0 ]] || die "needs root (installs packages and starts slurmctld/slurmd/munged)"

# ---------------------------------------------------------------- install
install_packages() {
    local pkgs=(slurmctld slurmd slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    if ! compgen -G "/var/lib/apt/lists/*_Packages" >/dev/null; then
        log "apt-get update"
        apt-get update -qq >&2
    fi
    log "installing ${pkgs[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2; then
        log "install failed; refreshing package lists and retrying"
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
    fi
}
for bin in slurmctld slurmd sbatch sinfo munged munge; do
    if ! command -v "$bin" >/dev/null && [[ ! -x /usr/sbin/$bin ]]; then install_packages; break; fi
done
export PATH=$PATH:/usr/sbin

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

# a cluster we started earlier that still answers: nothing to do
if [[ -f $CONF ]] && grep -qxF "$MARKER" "$CONF" && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" \
    && [[ -n $(node_state) ]]; then
    log "already running (node $(node_state))"
    echo "$STATE"
    exit 0
fi
if [[ -f $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to replace a real Slurm configuration"
fi

mkdir -p "$STATE"/{state,spool,log}

# ---------------------------------------------------------------- munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.started"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer"
fi

# ---------------------------------------------------------------- slurm.conf
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
    log "adding $HOST to /etc/hosts (Slurm and torch.distributed resolve the node name)"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi
# the node as slurmd sees it; RealMemory lowered by 10% so a busy machine never drains the node
NODE=$(slurmd -C | head -n1 | sed -E "s/^NodeName=[^ ]+/NodeName=$HOST/")
MEM=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$NODE")
[[ -n $MEM ]] && NODE=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$((MEM * 9 / 10))/" <<<"$NODE")

cat >"$CONF.tmp" <<EOF
$MARKER
ClusterName=levo
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job restarts after cred_expire seconds (default 120)
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# schedule often: a requeued job starts seconds after cred_expire, not at the next 30-60 s pass
SchedulerParameters=bf_interval=2,sched_interval=5
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
# finished jobs stay visible to scontrol for an hour (no accounting database here)
MinJobAge=3600
KillWait=10
InactiveLimit=0
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.tmp" "$CONF"
cp "$CONF" "$STATE/slurm.conf"

# ---------------------------------------------------------------- daemons
if alive "$STATE/slurmctld.pid"; then
    log "reconfiguring the running slurmctld"
    scontrol reconfigure >&2 || true
else
    log "starting slurmctld"
    slurmctld
fi
slurmd_started=""
if ! alive "$STATE/slurmd.pid"; then
    log "starting slurmd"
    slurmd_started=$(date +%FT%T)
    slurmd
fi

# ready: the node answers (no '*') and, when we just started slurmd, it has registered since
ready() {
    case $st in idle | mixed | allocated | completing) ;; *) return 1 ;; esac
    [[ -z $slurmd_started ]] && return 0
    local t
    t=$(scontrol show node "$HOST" 2>/dev/null | sed -nE 's/.*SlurmdStartTime=([0-9T:-]+).*/\1/p')
    [[ -n $t && ! $t < $slurmd_started ]]
}
deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
    st=$(node_state)
    ready && break
    case $st in
        down* | drain* | fail*)
            if ((resumed == 0)); then
                log "node is $st; resuming it"
                scontrol update NodeName="$HOST" State=RESUME >&2 || true
                resumed=1
            fi ;;
    esac
    if ((SECONDS > deadline)); then
        log "node not idle after ${TIMEOUT}s (state '${st:-no answer}'); logs:"
        tail -n 20 "$STATE"/log/*.log >&2 || true
        die "Slurm did not come up"
    fi
    sleep 0.5
done
log "up: node $HOST $st ($(sinfo -h -o '%c CPUs' | head -n1))"
echo "$STATE"
