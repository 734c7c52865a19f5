# Shared by slurm/*.sbatch (sourced, not run): paths, logging, and running a job step so that a
# preempted or time-limited job checkpoints and is requeued. See docs/slurm.md.
#
# The rules, measured on Slurm 22.05 (../shared/design/slurm-notes.md):
# - `#SBATCH --signal=B:USR1@N` signals only this batch shell, and bash runs a trap only once its
#   foreground child returns: so the step runs in the background (`srun ... &`), we `wait`, and
#   `wait` again after a trap has fired.
# - The trap forwards SIGUSR1 to the job's steps (`scancel --signal=USR1 JOB` reaches every process
#   of every step, not this shell). Every rank checkpoints at the same step and the step exits 75.
# - Exit 75 from the step: `scontrol requeue` this job. The requeued job keeps its id, so its run
#   directory (runs/<name>-<id>) is the same and training resumes there (checkpoint.resume=auto).
# - Preemption with a grace time signals only the steps (SIGTERM): they checkpoint and exit 75,
#   and we requeue in the same way. A SIGTERM to this shell means SLURM is ending the job itself
#   (scancel, time limit, preemption without grace): the steps got it too and checkpoint; we do not
#   requeue (a cancelled job stays cancelled; a preempted one is requeued by SLURM).

EXIT_PREEMPTED=75

log() { echo "[$(date '+%F %T')] ${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-} (restart ${SLURM_RESTART_COUNT:-0}): $*" >&2; }

# Absolute path of a setting that may be relative to the submit dir or to the repository.
resolve() {
    local p="$1"
    if [[ "$p" == /* || -e "$p" || ! -e "$HISTO_DIST_ROOT/$p" ]]; then echo "$p"; else echo "$HISTO_DIST_ROOT/$p"; fi
}

absolute() { if [[ "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }

setup_python() {
    # A virtual environment on PATH: VENV, else the checkout's .venv; else whatever PATH has
    # (module load / conda activate before sbatch: --export=ALL carries PATH into the job).
    local venv="${VENV:-$HISTO_DIST_ROOT/.venv}"
    if [[ -x "$venv/bin/python" ]]; then
        export PATH="$venv/bin:$PATH" PYTHON="$venv/bin/python"
    fi
    export PYTHONUNBUFFERED=1
    # Compute nodes usually have no network: W&B writes offline runs into RUN_DIR/wandb,
    # `wandb sync RUN_DIR/wandb/offline-run-*` uploads them later from a login node.
    export WANDB_MODE="${WANDB_MODE:-offline}"
}

# run_step CMD...: run CMD (an srun) in the background, forward SIGUSR1 to it, requeue on exit 75.
run_step() {
    local step rc=0
    _histo_signal=""
    trap '_histo_on_signal USR1' USR1
    trap '_histo_on_signal TERM' TERM
    "$@" &
    step=$!
    while true; do
        wait "$step" && rc=0 || rc=$?
        kill -0 "$step" 2>/dev/null || break  # still running: a trap interrupted `wait`; wait again
    done
    trap - USR1 TERM
    if [[ $rc -eq 0 ]]; then
        log "step finished"
        return 0
    fi
    if [[ "$_histo_signal" == TERM ]]; then
        log "step ended with $rc after SIGTERM to the batch shell: SLURM is ending this job; not requeueing"
        return "$rc"
    fi
    if [[ $rc -eq $EXIT_PREEMPTED ]]; then
        local restarts="${SLURM_RESTART_COUNT:-0}" max="${MAX_REQUEUES:-50}"
        if [[ $restarts -ge $max ]]; then
            log "preempted (step exit $EXIT_PREEMPTED), but already requeued $restarts times (MAX_REQUEUES=$max): not again"
            return "$rc"
        fi
        log "preempted (step exit $EXIT_PREEMPTED): requeueing; the job resumes from its newest checkpoint in the same run directory"
        scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed"
        return "$rc"  # SLURM ends this run now and queues the job again (same id, same run directory)
    fi
    log "step failed with exit code $rc${_histo_signal:+ (after SIG$_histo_signal)}"
    return "$rc"
}

_histo_on_signal() {
    if [[ "$1" == USR1 ]]; then
        if [[ -z "$_histo_signal" ]]; then
            log "got SIGUSR1 (time limit near): forwarding to the job steps; they checkpoint and exit $EXIT_PREEMPTED"
            scancel --signal=USR1 "$SLURM_JOB_ID" || log "scancel --signal=USR1 failed"
        fi
        _histo_signal="${_histo_signal:-USR1}"
    else
        log "got SIGTERM: SLURM is ending the job; the steps got it too and checkpoint"
        _histo_signal=TERM
    fi
}
