# Sourced by the launch scripts after they cd to the repository root. Sets the variables
# below (each can be overridden from the environment) and defines the helpers they use.

VENV=${VENV:-.venv}                            # python/torchrun come from $VENV/bin when it exists
DATA_DIR=${DATA_DIR:-data}                     # dataset folder (or .npz file), passed as --data-dir
CONFIG=${CONFIG:-configs/cifar10_dtp.yaml}     # passed as --config
# torchrun restarts the whole group this many times when a rank dies; --resume auto continues
# from the last checkpoint (elastic restart, tested on CPU in tests/test_parallel.py).
MAX_RESTARTS=${MAX_RESTARTS:-3}
# A job array from sweep.py --launcher slurm: task N runs line N + 1 of the file SWEEP_RUNS, its run
# directory (OUT) and then its training flags, shell-quoted. A requeued task keeps its index, so its OUT.
SWEEP_ARGS=()
if [[ -n ${SWEEP_RUNS-} ]]; then
    eval "SWEEP_ARGS=($(sed -n "$(( ${SLURM_ARRAY_TASK_ID:-0} + 1 ))p" "$SWEEP_RUNS"))"
    (( ${#SWEEP_ARGS[@]} )) || { echo "launch: no line for task ${SLURM_ARRAY_TASK_ID:-0} in $SWEEP_RUNS" >&2; exit 2; }
    OUT=${SWEEP_ARGS[0]} SWEEP_ARGS=("${SWEEP_ARGS[@]:1}")
fi
OUT=${OUT:-runs/${SLURM_JOB_NAME:-local}-${SLURM_JOB_ID:-$(date +%Y%m%d-%H%M%S)}}  # run directory

# Flags every launch passes. --resume auto continues from $OUT/checkpoint.pt when it exists,
# which is what makes a requeued job pick up where it stopped. Extra flags go after these.
# A sweep's flags follow (its --config and --data-dir win over these), and flags after the script name last.
TRAIN_ARGS=(--config "$CONFIG" --data-dir "$DATA_DIR" --out "$OUT" --resume auto "${SWEEP_ARGS[@]}")

# NCCL (GPU communication). Warnings only; use INFO when chasing a hang.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A rank that dies makes the others fail instead of hanging until the collective timeout
# (torchrun sets this too; torch < 2.2 reads the old name NCCL_ASYNC_ERROR_HANDLING=1).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Multi-node: if NCCL picks the wrong network interface, name the one the nodes share
# (`ip addr` lists them; a leading ^ excludes instead):
# export NCCL_SOCKET_IFNAME=ib0        # or eth0, or ^lo,docker0

# Marks this launch's processes (on every node: srun passes the environment on) so that
# launch/signal_leader.sh can find the rank-0 trainer.
export DTP_LAUNCH_TAG=${SLURM_JOB_ID:-local}-$$

# bin NAME: the venv's executable if there is one, else NAME from PATH.
bin() { if [[ -x $VENV/bin/$1 ]]; then echo "$VENV/bin/$1"; else echo "$1"; fi; }

# set_threads NPROC: OMP_NUM_THREADS = the task's CPUs shared by NPROC processes (at least 1).
set_threads() {
    local n=$(( ${SLURM_CPUS_PER_TASK:-$(nproc)} / $1 ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( n > 0 ? n : 1 ))}
}

# set_nproc: NPROC, the ranks per node under SLURM: as set, else one per GPU Slurm gave this node.
# A CPU-only job has no count to go by and must set it (a default of 1 once ran a parallel job on a
# single rank without a word); the count in use is printed either way.
set_nproc() {
    local from="NPROC"
    if [[ -z ${NPROC-} ]] && (( ${SLURM_GPUS_ON_NODE:-0} > 0 )); then
        NPROC=$SLURM_GPUS_ON_NODE from="one per GPU"
    fi
    if [[ -z ${NPROC-} ]]; then
        echo "launch: no GPU on this node: set NPROC, the ranks per node (e.g. NPROC=2 sbatch --gpus-per-node=0 ...)" >&2
        exit 2
    fi
    [[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "launch: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2; }
    echo "launch: $NPROC rank(s) per node ($from)"
}

# What the USR1 trap does; the scripts redefine it where the leader is elsewhere.
forward_usr1() { bash launch/signal_leader.sh; }

# run_with_requeue CMD...: run CMD in the background (pid TRAINER_PID) and wait for it.
# Slurm sends this shell SIGUSR1 120 s before the time limit (--signal=B:USR1@120); the trap
# hands it on to the trainer's leader, which writes a checkpoint and stops. Then the job
# requeues itself (allowed by --requeue) and its next start resumes with --resume auto.
run_with_requeue() {
    local rc=0 usr1=0 cut_short
    trap 'usr1=1 cut_short=1; echo "launch: SIGUSR1, asking the leader to checkpoint and stop"; forward_usr1' USR1
    echo "launch: $*"
    "$@" &
    TRAINER_PID=$!
    while :; do
        cut_short=0
        wait "$TRAINER_PID" && rc=0 || rc=$?
        (( cut_short && rc > 128 )) || break    # the trap interrupted `wait`: wait again
    done
    trap - USR1
    if (( usr1 )) && [[ -n ${SLURM_JOB_ID-} ]]; then
        echo "launch: trainer exited ($rc); requeueing job $SLURM_JOB_ID to resume from $OUT"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
