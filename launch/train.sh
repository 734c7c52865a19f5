#!/usr/bin/env bash
# Start `histo-dist train` with the right launcher for where it runs; every argument is passed on
# to `histo-dist train` (--config, --run-dir, key=value overrides).
#
#   launch/train.sh --config CONFIG [--run-dir DIR] [key=value ...]
#
# What it picks (HISTO_DIST_DRY_RUN=1 prints the command instead of running it):
#   one process in all (1 GPU, or CPU)   python -m histo_dist train ...   (no launcher: exit code 75 intact)
#   several GPUs on this machine          accelerate launch --config_file launch/accelerate/gpu_1node.yaml --num_processes G
#   HISTO_DIST_CPU=1, NPROC>1             ACCELERATE_USE_CPU=1 accelerate launch --config_file .../cpu_multi.yaml (gloo)
#   inside an srun step over N nodes      accelerate launch --config_file .../multinode.yaml --num_machines N
#                                           --machine_rank $SLURM_NODEID --main_process_ip <first node> --main_process_port P
#
# Environment (all optional):
#   HISTO_DIST_CPU=1           CPU processes (gloo) even where GPUs are present (test mode)
#   HISTO_DIST_NPROC=K         processes per machine (default: the GPUs visible here; 1 on CPU)
#   HISTO_DIST_NUM_MACHINES    machines (default: SLURM_NNODES inside an srun step, else 1)
#   HISTO_DIST_MACHINE_RANK    this machine's rank (default: SLURM_NODEID inside an srun step, else 0)
#   HISTO_DIST_HEAD            address of machine 0 (default: NodeAddr of the step's first node)
#   HISTO_DIST_PORT            rendezvous port (default: a free one on one machine; 20000 + job id % 10000 on several)
#   ACCELERATE_EXTRA_ARGS      more `accelerate launch` options, e.g. "--num_cpu_threads_per_process 8"
#   PYTHON                     interpreter (default: .venv/bin/python of this checkout if present, else python3)
#
# Preemption: SIGUSR1/SIGTERM make the training checkpoint and exit 75 (see docs/slurm.md). torchrun
# (under accelerate) ignores SIGUSR1 unless told: PET_SIGNALS_TO_HANDLE below makes it forward the
# signal to the ranks, and TORCH_ELASTIC_SHUTDOWN_TIMEOUT gives them time to write the checkpoint.
# torchrun then exits 1, not 75; inside SLURM this script remembers the signal and exits 75 itself.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"

die() { echo "launch/train.sh: error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON="$(command -v python3 || true)"; fi
fi
[[ -n "$PYTHON" ]] || die "no python3 on PATH; set PYTHON"

gpu_count() {
    if [[ "${HISTO_DIST_CPU:-0}" == 1 ]]; then echo 0; return; fi
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        case "$CUDA_VISIBLE_DEVICES" in
            ""|-1|NoDevFiles) echo 0 ;;
            *) awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES" ;;
        esac
        return
    fi
    if is_int "${SLURM_GPUS_ON_NODE:-}"; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
        return
    fi
    echo 0
}

GPUS="$(gpu_count)"
if [[ "$GPUS" -eq 0 ]]; then
    DEVICE=cpu
    NPROC="${HISTO_DIST_NPROC:-1}"
else
    DEVICE=gpu
    NPROC="${HISTO_DIST_NPROC:-$GPUS}"
fi

# Machines: only an srun step spans nodes. Read SLURM_NODEID here, on each node: expanded in the
# batch shell (or a double-quoted `srun bash -c "..."`), every node would get the first node's 0.
if [[ -n "${SLURM_STEP_ID:-}" ]]; then
    MACHINES="${HISTO_DIST_NUM_MACHINES:-${SLURM_NNODES:-1}}"
    RANK="${HISTO_DIST_MACHINE_RANK:-${SLURM_NODEID:-0}}"
else
    MACHINES="${HISTO_DIST_NUM_MACHINES:-1}"
    RANK="${HISTO_DIST_MACHINE_RANK:-0}"
    if [[ "${SLURM_NNODES:-1}" -gt 1 && -z "${HISTO_DIST_NUM_MACHINES:-}" ]]; then
        echo "launch/train.sh: warning: $SLURM_NNODES nodes allocated but not in an srun step: training on this node only" \
             "(use slurm/train_multinode.sbatch, or srun --ntasks-per-node=1 launch/train.sh ...)" >&2
    fi
fi
for v in NPROC MACHINES RANK; do is_int "${!v}" || die "$v must be a whole number, got '${!v}'"; done
[[ "$NPROC" -ge 1 && "$MACHINES" -ge 1 && "$RANK" -lt "$MACHINES" ]] || die "bad layout: $NPROC processes x $MACHINES machines, rank $RANK"

head_address() {
    if [[ -n "${HISTO_DIST_HEAD:-}" ]]; then echo "$HISTO_DIST_HEAD"; return; fi
    local list="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}" first addr
    [[ -n "$list" ]] || die "several machines but no HISTO_DIST_HEAD and no SLURM node list"
    first="$(scontrol show hostnames "$list" | head -n 1)"
    # NodeAddr is what slurmd itself is reached at; the node name need not resolve.
    addr="$(scontrol show node -o "$first" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)"
    echo "${addr:-$first}"
}

CMD=()
if [[ "$NPROC" -eq 1 && "$MACHINES" -eq 1 ]]; then
    [[ "$DEVICE" == cpu ]] && export ACCELERATE_USE_CPU=1
    CMD=("$PYTHON" -m histo_dist train "$@")
else
    if [[ "$MACHINES" -gt 1 ]]; then
        HEAD="$(head_address)"
        PORT="${HISTO_DIST_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 10000))}"
        CONFIG_FILE="$HERE/accelerate/multinode.yaml"
    else
        HEAD=127.0.0.1
        PORT="${HISTO_DIST_PORT:-0}"
        CONFIG_FILE="$HERE/accelerate/gpu_1node.yaml"
    fi
    if [[ "$DEVICE" == cpu ]]; then
        export ACCELERATE_USE_CPU=1
        CONFIG_FILE="$HERE/accelerate/cpu_multi.yaml"
    fi
    # torchrun reads PET_SIGNALS_TO_HANDLE (--signals-to-handle) since torch 2.10; older ones never forward SIGUSR1.
    if ! "$PYTHON" -c 'import sys; from importlib.metadata import version
sys.exit(tuple(int(p) for p in version("torch").split("+")[0].split(".")[:2]) < (2, 10))' 2>/dev/null; then
        echo "launch/train.sh: warning: this torch's launcher does not forward SIGUSR1 to the ranks (that needs torch >= 2.10): a time-limit signal will not checkpoint; SIGTERM still does" >&2
    fi
    export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
    read -r -a EXTRA <<<"${ACCELERATE_EXTRA_ARGS:-}"
    CMD=("$PYTHON" -m accelerate.commands.launch --config_file "$CONFIG_FILE"
         --num_machines "$MACHINES" --num_processes "$((NPROC * MACHINES))" --machine_rank "$RANK"
         --main_process_ip "$HEAD" --main_process_port "$PORT" ${EXTRA[@]+"${EXTRA[@]}"}
         -m histo_dist train "$@")
fi
if [[ "$DEVICE" == cpu && -z "${OMP_NUM_THREADS:-}" ]]; then
    export OMP_NUM_THREADS=1  # nothing pins CPU ranks; unset, each would start one thread per core
fi

echo "launch/train.sh: $DEVICE, $NPROC process(es) x $MACHINES machine(s), machine rank $RANK: $(printf '%q ' "${CMD[@]}")" >&2
if [[ "${HISTO_DIST_DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    exec "${CMD[@]}"  # on a workstation signals reach the launcher directly, and its exit code is ours
fi

# Inside SLURM a preemption signal reaches every process of the step (this shell included): note
# it, do not forward it (the launcher got it too), and report 75 when the run then stops.
signalled=""
trap 'signalled=USR1' USR1
trap 'signalled=TERM' TERM
"${CMD[@]}" &
child=$!
rc=0
while true; do
    wait "$child" && rc=0 || rc=$?
    kill -0 "$child" 2>/dev/null || break  # still there: a trap interrupted `wait`; wait again
done
if [[ $rc -ne 0 && -n "$signalled" ]]; then
    echo "launch/train.sh: stopped after SIG$signalled (launcher exit $rc): exit 75 for requeue" >&2
    exit 75
fi
exit "$rc"
