#!/bin/bash
# A workstation: torchrun --standalone with one train_parallel.py rank per GPU (2 CPU ranks
# when there is no GPU), or python train_sequential.py when NPROC=1.
#   bash launch/local.sh [training flags, e.g. --epochs 3]
#   NPROC=1 OUT=runs/mine bash launch/local.sh --algorithm bp
# Variables: NPROC, VENV, DATA_DIR, CONFIG, OUT (launch/common.sh; default runs/local-<time>,
# so each call starts a new run; set OUT to an existing run directory to continue it).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/common.sh

# GPUs this process may use: CUDA_VISIBLE_DEVICES when set (empty means none), else nvidia-smi.
gpu_count() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true
    elif command -v nvidia-smi >/dev/null; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}
NPROC=${NPROC:-$(gpu_count)}
(( NPROC > 0 )) || NPROC=2
set_threads "$NPROC"

if (( NPROC == 1 )); then
    cmd=("$(bin python)" train_sequential.py)
else
    cmd=("$(bin torchrun)" --standalone --nproc_per_node="$NPROC" train_parallel.py)
fi
echo "launch: ${cmd[*]} ${TRAIN_ARGS[*]} $*"
exec "${cmd[@]}" "${TRAIN_ARGS[@]}" "$@"
