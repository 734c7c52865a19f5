"""Preemption: what SIGUSR1 / SIGTERM do in every process of a run.

SLURM sends SIGUSR1 before a job's time limit (`--signal=B:USR1@300`) and SIGTERM when it preempts
a job, to every process of the step: the training processes and their loader workers alike.

- A training process only remembers that the signal came (`PreemptionFlag`); the trainer acts on
  it at the next step boundary: every rank checkpoints at the same step and the process exits with
  `EXIT_PREEMPTED` (75), on which the sbatch scripts requeue the job.
- Loader workers ignore both signals (`ignore_in_worker`), and are started with them blocked
  (`start_with_signals_blocked`), so that neither torch's worker handler nor the default action
  kills a worker before the training process has written its checkpoint.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import TypeVar

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; slurm/*.sbatch requeue the job on this code
SIGNALS = frozenset({signal.SIGUSR1, signal.SIGTERM})

T = TypeVar("T")


class Preempted(Exception):
    """A preemption signal arrived; a checkpoint was written and the run should be requeued."""


class PreemptionFlag:
    """Remembers that SIGUSR1/SIGTERM arrived. The handler only sets a flag (safe to run twice,
    and SLURM may deliver the signal to every process of a step); the training loop acts on it."""

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> None:
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name

    def ignore(self) -> None:
        """Ignore further preemption signals, once the checkpoint is written and the process is on its
        way out with 75. Python restores the default handlers while it shuts down; a late signal then
        (torchrun stopping the ranks that have not exited yet, SLURM signalling again) would kill the
        process, which would report -15 instead of the 75 a requeue needs."""
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def ignore_in_worker(worker_id: int) -> None:
    """`worker_init_fn` of loader workers: leave SIGTERM/SIGUSR1 to the training process, which
    checkpoints on them. Workers still exit with their parent."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # (also discards one that arrived while blocked)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


def start_with_signals_blocked(start: Callable[[], T]) -> T:
    """Call `start` (which forks loader workers) with SIGTERM/SIGUSR1 blocked: a worker inherits the
    mask, so a signal arriving before it has run `ignore_in_worker` waits instead of killing it. In
    the calling process the signal is delivered when the mask is lifted, a moment later."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        return start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
