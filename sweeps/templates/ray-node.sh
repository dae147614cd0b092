#!/bin/bash
# Written by `medattn sweep --slurm` ({{version}}). Started by sweep.sbatch with srun, once per
# node: `ray-node.sh head PORT` on the first node, `ray-node.sh worker HEAD_IP:PORT` on the
# others. `ray start --block` stays in the foreground, so SLURM sees the step for as long as Ray
# runs there, and SIGTERM to the step stops that node's Ray processes.
set -u
role=$1
where=$2
# Per-node temp dir: nodes that share a host (and other jobs) stay apart.
args=(--block --temp-dir="/tmp/ray-${SLURM_JOB_ID}-${SLURMD_NODENAME}" --num-cpus="${SLURM_CPUS_PER_TASK:-1}"
      --num-gpus={{gpus_per_node}} --disable-usage-stats)
# The node's own address as the cluster resolves its name (Ray's own guess may be another NIC).
ip=$(getent ahostsv4 "$SLURMD_NODENAME" | awk 'NR==1 {print $1}')
[ -n "$ip" ] && args+=(--node-ip-address="$ip")
if [ "$role" = head ]; then
    args+=(--head --port="$where" --include-dashboard=false --ray-client-server-port=$((where + 1)))
else
    args+=(--address="$where")
fi
exec {{python}} -m ray.scripts.scripts start "${args[@]}"
