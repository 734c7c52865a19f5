"""Running histo-dist as users do, for the tests that start real processes: the training command
for one process or two real ranks, waiting for a step, and reading back what a run left.

Runs are small and deterministic: learnable 32x32 shards and `configs/cpu_test.yaml` with
`train.deterministic=true`, so an interrupted-and-resumed run can be compared bitwise with an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from histo_dist.checkpoint import CheckpointConfig, Checkpointer, load_checkpoint
from tests.shard_data import make_dataset

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "PYTHONUNBUFFERED": "1",
    "ACCELERATE_USE_CPU": "1",
    "PYTHONPATH": str(ROOT),
}

# `accelerate launch` on gloo, started as launch/train.sh starts it: the `accelerate` command imports every one of
# its subcommands first, timm among them (for `estimate-memory`), which adds some 4 s to each launch here.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--main_process_port", "0"]

# 252 training samples in uneven shards (15 steps of 16 per epoch on one rank), 88 valid, 64 test.
TRAIN_SIZES = {"train": [100, 92, 60], "valid": [48, 40], "test": [64]}


def make_train_shards(root: Path) -> Path:
    make_dataset(root, TRAIN_SIZES, shape=(32, 32, 3), learnable=True)
    return root


def train_cmd(shards: Path, run_dir: Path, *overrides: str, ranks: int = 1) -> list[str]:
    """`histo-dist train` on the shipped single-CPU config, in one process or under accelerate launch."""
    args = [
        "-m",
        "histo_dist",
        "train",
        "--config",
        str(ROOT / "configs/cpu_test.yaml"),
        "--run-dir",
        str(run_dir),
        f"data.shards={shards}",
        *overrides,
    ]
    if ranks == 1:
        return [sys.executable, *args]
    return [*ACCELERATE_LAUNCH, "--num_processes", str(ranks), *args]


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """A run in its own session (process group): the whole job can be signalled as SLURM does."""
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env or ENV, start_new_session=True
    )


def run(cmd: list[str], timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=timeout, **kwargs)


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    """metrics.jsonl's records (of one kind: train, valid, test)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, filter(None, lines)) if kind is None or r["kind"] == kind]


def logged_step(run_dir: Path) -> int:
    """The last optimizer step rank 0 wrote to metrics.jsonl (0 before the first record)."""
    return max((r["step"] for r in records(run_dir)), default=0)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the fault could be injected: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def checkpointer(run_dir: Path) -> Checkpointer:
    return Checkpointer(run_dir / "checkpoints", CheckpointConfig())


def final_state(run_dir: Path) -> dict:
    newest = checkpointer(run_dir).newest_valid()
    assert newest is not None, f"no valid checkpoint in {run_dir}"
    return load_checkpoint(newest)


def results_of(run_dir: Path) -> dict:
    """RUN/test/metrics.json without the checkpoint's path (which names the run directory)."""
    results = json.loads((run_dir / "test" / "metrics.json").read_text())
    results.pop("checkpoint")
    return results


def assert_same_weights(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def assert_same_run(expected: Path, got: Path) -> None:
    """Bitwise-equal final weights (and optimizer step) and equal test results."""
    a, b = final_state(expected), final_state(got)
    assert a["step"] == b["step"]
    assert_same_weights(a["model"], b["model"])
    assert results_of(got) == results_of(expected)
