"""A loss that becomes NaN, in a real `histo-dist train` process: the run stops with exit 2 and an
error naming the step and the last good checkpoint, which is intact and finite; no traceback.

The same in-process (the error type, its step) is
tests/test_train.py::test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint.
"""

from __future__ import annotations

import sys

import pytest
import torch

from histo_dist.checkpoint import load_checkpoint
from tests.faults.harness import ONE_RANK, no_traceback, train_cmd
from tests.runs import checkpointer, run

# The training command with the loss poisoned from optimizer step 8 on (no config can make the loss
# NaN: non-finite settings are rejected up front, and images are uint8).
POISONED = """
import sys
import histo_dist.train as t
real = t.Trainer.loss
t.Trainer.loss = lambda self, logits, labels: real(self, logits, labels) * (float("nan") if self.step >= 7 else 1.0)
from histo_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, *ONE_RANK, "checkpoint.every_steps=3")
    out = run([sys.executable, "-c", POISONED, *cmd[3:]])  # cmd is [python, -m, histo_dist, train, ...]
    assert out.returncode == 2, out.stderr[-3000:]
    no_traceback(out.stderr)
    last = checkpointer(run_dir).newest_valid()
    assert last is not None and last.name == "step-00000006.pt"
    assert (
        f"histo-dist train: error: loss is nan at optimizer step 8: stopping. Last good checkpoint: {last}"
        in out.stderr
    )
    state = load_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run_dir / "checkpoints/step-00000008.pt").exists()
