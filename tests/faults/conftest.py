"""Fixtures of the fault suite: one tiny dataset and one uninterrupted run per layout, shared by
every test that compares a faulted run with an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import ONE_RANK, SHAPE, SIZES, TWO_RANKS, train_cmd
from tests.runs import run
from tests.shard_data import make_dataset


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault-shards")
    make_dataset(root, SIZES, shape=SHAPE, learnable=True)
    return root


@pytest.fixture(scope="session")
def reference_one(shards, tmp_path_factory) -> Path:
    """An uninterrupted single-process run (checkpoints at the epoch ends: steps 12 and 24)."""
    run_dir = tmp_path_factory.mktemp("reference-one") / "run"
    out = run(train_cmd(shards, run_dir, *ONE_RANK))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def reference_two(shards, tmp_path_factory) -> Path:
    """An uninterrupted two-rank run (6 steps per epoch, checkpoints every 2 steps)."""
    run_dir = tmp_path_factory.mktemp("reference-two") / "run"
    out = run(train_cmd(shards, run_dir, *TWO_RANKS, ranks=2))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir
