"""Elastic exact resume with real processes: a run preempted mid-epoch continues on another number of ranks
or loader workers; every epoch trains every sample exactly once (RUN/samples.jsonl), and the final weights
are those of an uninterrupted run with the same global batch, to the tolerance of a different reduction order."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.faults.harness import rank_pids
from tests.runs import final_state, logged_step, make_train_shards, run, start, train_cmd, wait_for

pytestmark = pytest.mark.slow

# Global batch 16 = 8 per micro-batch x accumulation x ranks; 252 samples: 15 steps per epoch, 2 epochs.
BASE = [
    "loader.batch_size=8",
    "loader.eval_batch_size=32",
    "loader.shuffle_buffer=64",
    "train.epochs=2",
    "train.deterministic=true",
    "tracking.progress=false",
    "tracking.wandb=false",
    "tracking.log_every_steps=1",
    "tracking.log_samples=true",
    "schedule.warmup_steps=3",
    "data.test_split=",
    "checkpoint.every_steps=4",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_train_shards(tmp_path_factory.mktemp("elastic-shards"))


def command(shards: Path, run_dir: Path, ranks: int, workers: int, accumulation: int) -> list[str]:
    layout = [f"loader.num_workers={workers}", f"train.grad_accum_steps={accumulation}"]
    return train_cmd(shards, run_dir, *BASE, *layout, ranks=ranks)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("elastic-reference") / "run"
    out = run(command(shards, run_dir, 1, 1, 2), timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def trained(run_dir: Path) -> dict[int, list[str]]:
    """epoch -> keys trained in it (the last record of each step: a step retrained after a resume counts once)."""
    steps = {}
    for record in map(json.loads, (run_dir / "samples.jsonl").read_text().splitlines()):
        steps[(record["epoch"], record["step"])] = record
    epochs: dict[int, list[str]] = {}
    for (epoch, _), record in sorted(steps.items()):
        epochs.setdefault(epoch, []).extend(record["keys"])
    return epochs


@pytest.mark.parametrize(
    "before, after",  # (ranks, workers, accumulation) -> (ranks, workers), the same command otherwise
    [((2, 1, 1), (1, 1)), ((1, 1, 2), (2, 1)), ((1, 2, 2), (1, 0)), ((1, 2, 2), (1, 3))],
)
def test_preempted_mid_epoch_and_resumed_on_another_layout(shards, reference, tmp_path, before, after):
    run_dir = tmp_path / "run"
    ranks, workers, accumulation = before
    proc = start(command(shards, run_dir, *before))
    pids = rank_pids(proc, ranks) if ranks > 1 else {}
    wait_for(lambda: logged_step(run_dir) >= 6, proc, timeout=300)  # mid-epoch 1 of 2 (15 steps each)
    if pids:
        os.kill(pids[0], signal.SIGUSR1)  # (accelerate launch does not forward it; SLURM signals every rank)
    else:
        os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=120) in (75, 1), proc.stderr.read()[-3000:]  # (accelerate launch exits 1)
    assert 6 <= final_state(run_dir)["step"] < 15
    out = run(command(shards, run_dir, *after, accumulation), timeout=400)  # requeued onto another size
    assert out.returncode == 0, out.stderr[-3000:]
    if after[0] != ranks:
        assert (
            f"gradient accumulation {accumulation * ranks // after[0]} (configured {accumulation}) keeps its "
            "global batch of 16" in out.stderr
        )
    worlds = {json.loads(line)["world_size"] for line in (run_dir / "samples.jsonl").read_text().splitlines()}
    assert worlds == {ranks, after[0]}
    epochs = trained(run_dir)
    assert sorted(epochs) == [0, 1]
    for epoch, keys in epochs.items():
        assert len(keys) == len(set(keys)) == 240, epoch  # 15 steps x 16: each sample at most once, all steps
    assert trained(reference) == epochs  # the same samples in the same steps as the uninterrupted run
    expected, got = final_state(reference), final_state(run_dir)
    assert expected["step"] == got["step"] == 30
    for key in expected["model"]:  # the reduction order differs (ranks' all-reduce vs accumulation)
        torch.testing.assert_close(got["model"][key], expected["model"][key], atol=1e-5, rtol=1e-4, msg=key)


def test_a_global_batch_the_new_layout_cannot_make_is_refused_with_settings_that_would(shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    out = run(command(shards, run_dir, 2, 1, 1) + ["train.max_steps=4"], timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run(train_cmd(shards, run_dir, *BASE, "loader.batch_size=5", "train.max_steps=4", ranks=1), timeout=400)
    assert out.returncode == 2
    assert "its global batch is 16" in out.stderr and "loader.batch_size=8 train.grad_accum_steps=2" in out.stderr
