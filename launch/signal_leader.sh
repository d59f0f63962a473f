#!/bin/bash
# Send SIGUSR1 to this launch's leader (the rank-0 train_parallel.py process) on this node;
# on other nodes it finds nothing. The leader is the process whose environment holds both
# DTP_LAUNCH_TAG (set by launch/common.sh) and RANK=0 (set by torchrun) and whose parent
# does not hold RANK=0: its own children, e.g. data-loader workers, inherit both variables.
# Other ranks and torchrun itself are left alone (SIGUSR1 would kill them).
set -uo pipefail
tag=${DTP_LAUNCH_TAG:?launch/common.sh sets DTP_LAUNCH_TAG}

has_rank0() { grep -qzx 'RANK=0' "/proc/$1/environ" 2>/dev/null; }

leaders=()
for env_file in $(grep -lzxF "DTP_LAUNCH_TAG=$tag" /proc/[0-9]*/environ 2>/dev/null); do
    pid=${env_file//[^0-9]/}
    has_rank0 "$pid" || continue
    ppid=$(ps -o ppid= -p "$pid" | tr -d ' ')
    [[ -n $ppid ]] && ! has_rank0 "$ppid" || continue
    leaders+=("$pid")
done
# Signal only after every process has been looked at: a leader that exits at once leaves its
# children to a new parent, and they would then pass for leaders themselves.
for pid in "${leaders[@]}"; do
    kill -USR1 "$pid" && echo "launch: SIGUSR1 sent to the leader, pid $pid on $HOSTNAME"
done
exit 0
