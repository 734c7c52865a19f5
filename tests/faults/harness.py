"""What the fault tests share beyond tests/runs.py: their tiny dataset and run settings, and helpers
to find the rank processes of a launcher, wait for a process group to go, and limit file sizes.

One process or `accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU), always with
`train.deterministic=true`, so an interrupted-and-resumed run can be compared bitwise with an
uninterrupted one.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

from tests.runs import train_cmd as _train_cmd

# 192 training samples in 3 shards (12 steps per epoch on one rank, 6 on each of two), 64 valid, 32 test.
SIZES = {"train": [64, 64, 64], "valid": [32, 32], "test": [32]}
SHAPE = (32, 32, 3)
BASE = [
    "loader.batch_size=16",
    "loader.eval_batch_size=32",
    "loader.shuffle_buffer=64",
    "train.epochs=2",
    "train.deterministic=true",
    "tracking.progress=false",
    "tracking.wandb=false",
    "schedule.warmup_steps=3",
]
# The settings of the faulted runs and of their uninterrupted references (the same command).
ONE_RANK = ["loader.num_workers=1", "tracking.log_every_steps=2"]
TWO_RANKS = ["loader.num_workers=0", "tracking.log_every_steps=1", "checkpoint.every_steps=2"]


def train_cmd(shards: Path, run_dir: Path, *overrides: str, ranks: int = 1) -> list[str]:
    """The fault suite's run: BASE plus `overrides`, in one process or under accelerate launch."""
    return _train_cmd(shards, run_dir, *BASE, *overrides, ranks=ranks)


def rank_pids(launcher: subprocess.Popen, ranks: int, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} of the training processes started by an `accelerate launch` process."""
    deadline = time.monotonic() + timeout
    while True:
        found = {}
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True).stdout
        for pid in map(int, out.split()):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = pid
        if len(found) == ranks:
            return found
        assert time.monotonic() < deadline and launcher.poll() is None, f"rank processes not found: {found}"
        time.sleep(0.1)


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group (a job started by `start`) is still there."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pgid: int, timeout: float) -> float:
    """Seconds until no process of the group is left (asserts it happens within `timeout`)."""
    t0 = time.monotonic()
    while group_alive(pgid):
        assert time.monotonic() - t0 < timeout, f"processes of the job still running after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]


def limit_file_size(limit: int):
    """preexec_fn: files the process writes may not grow past `limit` bytes. As on a full disk, the
    write fails (EFBIG); SIGXFSZ, which would kill the process instead, is ignored."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply
