"""Evaluation outputs under faults: a `histo-dist evaluate` killed while it writes its files, a
failure while the new set replaces the old, an evaluation with fewer files than the one before.

A folder holds one evaluation: the new set is written into a hidden staging folder and then moved
into place, metrics.json last. A kill leaves the earlier set whole (or, in the moment of the swap,
no metrics.json: the mark of an incomplete set), never a mix, never a cut-short file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histo_dist.evaluate import EvalConfig, evaluate
from histo_dist.files import sha256_file
from tests.runs import ENV


def eval_cfg(shards: Path, checkpoint: Path, output: Path, **kw) -> EvalConfig:
    base = dict(
        checkpoint=str(checkpoint), data=str(shards), output=str(output), num_workers=0, bootstrap=50, progress=False
    )
    return EvalConfig(**{**base, **kw})


def files_of(folder: Path) -> dict[str, str]:
    """{name: sha256} of the files in an evaluation folder (not the hidden staging folders)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def staging(folder: Path) -> list[Path]:
    return list(folder.glob(".evaluation-*.partial"))


def mtimes(folder: Path) -> dict[str, int]:
    found = {}
    for p in folder.rglob("*"):
        try:
            found[str(p.relative_to(folder))] = p.stat().st_mtime_ns
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return found


def writing_plots(folder: Path, before: dict[str, int]) -> bool:
    """Whether a plot file newer than the earlier evaluation's exists anywhere under `folder` (whole or partial)."""
    return any(".png" in Path(name).name and before.get(name) != t for name, t in mtimes(folder).items())


@pytest.mark.slow
def test_evaluate_killed_while_writing_leaves_the_earlier_evaluation_whole(shards, reference_one, tmp_path):
    """Killed while it writes predictions.csv and the plots, an evaluation used to leave the new
    predictions.csv beside the old metrics.json and plots (and a 0-byte errors.png)."""
    out = tmp_path / "eval"
    best = reference_one / "checkpoints/best.pt"
    evaluate(eval_cfg(shards, best, out, threshold="youden"))
    before, written = files_of(out), mtimes(out)
    assert "metrics.json" in before and "errors.png" in before

    cmd = [sys.executable, "-m", "histo_dist", "evaluate", "--checkpoint", str(best), "--data", str(shards)]
    cmd += ["--output", str(out), "--tta", "--threshold", "f1", "--bootstrap", "50", "--num-workers", "0"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not writing_plots(out, written):  # killed while plotting
        assert proc.poll() is None, f"evaluate ended before it could be killed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert files_of(out) == before  # the earlier set, whole: no new file beside it, none cut short
    assert staging(out)  # what the killed run had written, out of the way
    print(f"killed while writing {sorted(p.name for p in staging(out)[0].iterdir())}")

    results = evaluate(eval_cfg(shards, best, out, threshold="f1", tta=True))  # the next one clears it
    assert not staging(out)
    assert json.loads((out / "metrics.json").read_text())["tta"]["threshold"] == results["tta"]["threshold"]
    assert all(p.stat().st_size > 0 for p in out.iterdir())


def test_a_failure_while_the_new_set_moves_in_leaves_no_metrics_json(shards, reference_one, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    best = reference_one / "checkpoints/best.pt"
    evaluate(eval_cfg(shards, best, out))
    real_replace, moved = os.replace, []

    def failing_replace(src, dst):  # the second file moved into the folder fails (files are written before)
        if Path(dst).parent == out:
            if len(moved) == 1:
                raise OSError(28, "No space left on device")
            moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        evaluate(eval_cfg(shards, best, out, threshold="youden"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (out / "metrics.json").exists()  # the set is marked incomplete
    assert not staging(out)
    evaluate(eval_cfg(shards, best, out, threshold="youden"))
    assert json.loads((out / "metrics.json").read_text())["threshold_method"] == "youden"


def test_files_of_an_earlier_evaluation_that_the_new_one_lacks_are_removed(shards, reference_one, tmp_path):
    out = tmp_path / "eval"
    best = reference_one / "checkpoints/best.pt"
    evaluate(eval_cfg(shards, best, out, tta=True))
    assert (out / "confusion_matrix_tta.png").exists()
    (out / "notes.txt").write_text("the user's own file")
    evaluate(eval_cfg(shards, best, out, plots=False))
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt", "predictions.csv"]
