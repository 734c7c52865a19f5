"""What the fault tests share: a tiny learnable dataset, the training command for one or two real
ranks, and helpers to wait for a step, find the rank processes of a launcher and check a run.

One process or `accelerate launch --multi_gpu --num_processes 2` (gloo on the CPU), always with
`train.deterministic=true`, so an interrupted-and-resumed run can be compared bitwise with an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from histo_dist.checkpoint import CheckpointConfig, Checkpointer, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
       "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}

# 192 training samples in 3 shards (12 steps per epoch on one rank, 6 on each of two), 64 valid, 32 test.
SIZES = {"train": [64, 64, 64], "valid": [32, 32], "test": [32]}
SHAPE = (32, 32, 3)
BASE = [
    "loader.batch_size=16", "loader.eval_batch_size=32", "loader.shuffle_buffer=64", "train.epochs=2",
    "train.deterministic=true", "tracking.progress=false", "tracking.wandb=false", "schedule.warmup_steps=3",
]
# The settings of the faulted runs and of their uninterrupted references (the same command).
ONE_RANK = ["loader.num_workers=1", "tracking.log_every_steps=2"]
TWO_RANKS = ["loader.num_workers=0", "tracking.log_every_steps=1", "checkpoint.every_steps=2"]


def train_cmd(shards: Path, run_dir: Path, *overrides: str, ranks: int = 1) -> list[str]:
    """`histo-dist train` on the shipped single-CPU config, in one process or under accelerate launch."""
    args = ["-m", "histo_dist", "train", "--config", str(ROOT / "configs/cpu_test.yaml"), "--run-dir", str(run_dir),
            f"data.shards={shards}", *BASE, *overrides]
    if ranks == 1:
        return [sys.executable, *args]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(ranks), "--main_process_port", "0",
            *args]


def start(cmd: list[str]) -> subprocess.Popen:
    """A run in its own session (process group): the whole job can be signalled as SLURM does."""
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def run(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, **kwargs)


def logged_step(run_dir: Path) -> int:
    """The last optimizer step rank 0 wrote to metrics.jsonl (0 before the first record)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the fault could be injected: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


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


def checkpointer(run_dir: Path) -> Checkpointer:
    return Checkpointer(run_dir / "checkpoints", CheckpointConfig())


def final_state(run_dir: Path) -> dict:
    newest = checkpointer(run_dir).newest_valid()
    assert newest is not None, f"no valid checkpoint in {run_dir}"
    return load_checkpoint(newest)


def assert_same_run(expected: Path, got: Path) -> None:
    """Bitwise-equal final weights (and optimizer step) and equal test metrics."""
    a, b = final_state(expected), final_state(got)
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert json.loads((got / "test_metrics.json").read_text()) == json.loads((expected / "test_metrics.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]


def limit_file_size(limit: int):
    """preexec_fn: files the process writes may not grow past `limit` bytes. As on a full disk, the
    write fails (EFBIG); SIGXFSZ, which would kill the process instead, is ignored."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply
