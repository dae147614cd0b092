#!/usr/bin/env bash
# A real two-node SLURM cluster on this one host, for tests and demos.
#
#   scripts/slurm-local.sh start    start munged, slurmctld and slurmd n1, n2 (idempotent)
#   scripts/slurm-local.sh stop     stop them (the state directory is kept; `start` again reuses it)
#   scripts/slurm-local.sh status   exit 0 when the cluster answers, print sinfo and the env to use
#   scripts/slurm-local.sh env      print `export SLURM_CONF=...` (eval "$(scripts/slurm-local.sh env)")
#
# Then: medattn submit --profile local ...  (jobs/profiles/local.yaml: partition debug, no GPUs).
#
# Needs root and the Debian packages slurm-wlm and munge (`make system-deps`). Everything this
# script writes lives under $MEDATTN_SLURM_DIR (default /tmp/medattn-slurm): munge key and socket,
# slurm.conf, state, spool, logs and pid files. The only change outside it is one /etc/hosts line, `127.0.0.1 n1 n2`, so the
# node names resolve. Clients find the cluster through SLURM_CONF=$MEDATTN_SLURM_DIR/slurm.conf.
#
# Exit status: 0 ok, 1 failure, 3 slurm or munge not installed, 4 not root (tests skip on 3/4).
set -euo pipefail

DIR=${MEDATTN_SLURM_DIR:-/tmp/medattn-slurm}
CTLD_PORT=${MEDATTN_SLURM_CTLD_PORT:-16817}
NODE_PORT0=${MEDATTN_SLURM_NODE_PORT:-17001}
NODES=(n1 n2)
CPUS=${MEDATTN_SLURM_CPUS:-2}  # per node; the two "nodes" share this host's cores (oversubscribed)
HOST=$(hostname -s)
CONF=$DIR/slurm.conf
MUNGE_SOCK=$DIR/munge/munge.socket
export SLURM_CONF=$CONF

die() { echo "slurm-local: $*" >&2; exit "${2:-1}"; }

need_tools() {
    local missing=()
    for t in munged mungekey slurmctld slurmd sbatch scontrol sinfo; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    [ ${#missing[@]} -eq 0 ] || die "not installed: ${missing[*]} (as root: apt-get install -y slurm-wlm munge, or make system-deps)" 3
    [ "$(id -u)" -eq 0 ] || die "must run as root (munged runs as user munge, slurmd as root)" 4
    id munge >/dev/null 2>&1 || die "user munge missing (is the munge package installed?)" 3
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    mkdir -p "$DIR"/{state,log,run} "$DIR"/spool/{n1,n2}
    cat > "$CONF.tmp" <<CONF
# written by scripts/slurm-local.sh: two slurmd (n1, n2) on host $HOST
ClusterName=medattn
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCK,cred_expire=${MEDATTN_SLURM_CRED_EXPIRE:-10}
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in containers/VMs: track processes by /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=100000,bf_interval=1
# finished jobs stay visible to scontrol for an hour (there is no accounting database, so no sacct)
MinJobAge=3600
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
SlurmctldTimeout=60
InactiveLimit=0
KillWait=5
MessageTimeout=20
# preemption: a job in partition "urgent" requeues jobs in "debug", which are sent their
# --signal (USR2) first: that is what submitit and medattn's requeue logic react to
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$NODE_PORT0-$((NODE_PORT0 + 1)) CPUs=$CPUS RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=n[1-2] Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
    mv "$CONF.tmp" "$CONF"
}

hosts_line() {
    if ! getent hosts n1 >/dev/null || ! getent hosts n2 >/dev/null; then
        echo "127.0.0.1 n1 n2  # medattn slurm-local" >> /etc/hosts
    fi
}

start_munge() {
    mkdir -p "$DIR/munge"
    chown munge: "$DIR/munge"
    chmod 0700 "$DIR/munge"
    if alive "$DIR/munge/munged.pid" && munge -n -S "$MUNGE_SOCK" 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; then
        return 0
    fi
    [ -f "$DIR/munge/munge.key" ] || su -s /bin/sh munge -c "mungekey -c -k '$DIR/munge/munge.key'"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    su -s /bin/sh munge -c "munged --socket='$MUNGE_SOCK' --key-file='$DIR/munge/munge.key' \
        --pid-file='$DIR/munge/munged.pid' --log-file='$DIR/munge/munged.log' --seed-file='$DIR/munge/munged.seed' --force"
    for _ in $(seq 50); do
        munge -n -S "$MUNGE_SOCK" 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged did not start; see $DIR/munge/munged.log"
}

start_slurm() {
    if ! alive "$DIR/run/slurmctld.pid"; then
        slurmctld -f "$CONF"
    fi
    for n in "${NODES[@]}"; do
        alive "$DIR/run/slurmd-$n.pid" || slurmd -f "$CONF" -N "$n"
    done
    # wait until both nodes are idle (or allocated/mixed: a reused state may have jobs)
    local out=""
    for _ in $(seq 150); do
        out=$(sinfo -h -N -p debug -o "%N %t" 2>/dev/null || true)
        if [ "$(grep -cE ' (idle|alloc|mix|comp)$' <<<"$out")" -eq 2 ]; then
            return 0
        fi
        # nodes left "down" by an earlier stop come back once their slurmd registers
        scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
        sleep 0.2
    done
    die "nodes not ready after 30 s: $out; see $DIR/log/"
}

stop_all() {
    for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/munge/munged.pid"; do
        [ -f "$f" ] || continue
        local pid
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$f"
    done
    return 0
}

status() {
    alive "$DIR/run/slurmctld.pid" || { echo "slurm-local: not running ($DIR)"; return 1; }
    sinfo -N -o "%N %P %t %c %G" || return 1
    echo "export SLURM_CONF=$CONF"
    echo "submit with: medattn submit --profile local ..."
}

case "${1:-}" in
    start)
        need_tools
        hosts_line
        [ -f "$CONF" ] && alive "$DIR/run/slurmctld.pid" || write_conf
        start_munge
        start_slurm
        echo "slurm-local: up (nodes n1 n2, partitions debug urgent); export SLURM_CONF=$CONF"
        ;;
    stop)
        stop_all
        echo "slurm-local: stopped"
        ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
