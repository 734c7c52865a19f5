"""Checkpoints under faults: cut short or corrupted on disk, a full disk while one is written, and
files crafted to run code when unpickled.

A checkpoint is valid only when its .sha256 file exists and matches (written after the data, both
atomically); `resume=auto` skips invalid ones with a warning naming each, and every load is
`weights_only`, so no code from a file ever runs.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess

import pytest
import torch

from histo_dist.checkpoint import CheckpointConfig, Checkpointer, CheckpointError, load_checkpoint
from histo_dist.files import sha256_file
from tests.faults.harness import ONE_RANK, limit_file_size, no_traceback, train_cmd
from tests.runs import ENV, assert_same_run, checkpointer, run


def small_checkpoints(folder, steps=(2, 4)) -> Checkpointer:
    ckpt = Checkpointer(folder, CheckpointConfig(keep_last=5))
    for step in steps:
        ckpt.save(step, {"step": step, "model": {"w": torch.arange(2000, dtype=torch.float32) * step}})
    return ckpt


# ---------------------------------------------------------------------------------------------
# Cut short or corrupted on disk


DAMAGE = {
    "truncated to half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "truncated by one byte": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "emptied": lambda p: p.write_bytes(b""),
    "one byte flipped": lambda p: p.write_bytes(
        bytes(b ^ 0xFF if i == p.stat().st_size // 3 else b for i, b in enumerate(p.read_bytes()))
    ),
    "checksum file missing (cut short while written)": lambda p: p.with_suffix(".pt.sha256").unlink(),
    "checksum file empty": lambda p: p.with_suffix(".pt.sha256").write_text(""),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_never_valid_and_resume_takes_the_previous(tmp_path, caplog, damage):
    ckpt = small_checkpoints(tmp_path)
    newest = ckpt.path_for(4)
    assert ckpt.is_valid(newest) == (True, "")
    DAMAGE[damage](newest)
    ok, why = ckpt.is_valid(newest)
    assert not ok and why
    with caplog.at_level(logging.WARNING):
        assert ckpt.newest_valid() == ckpt.path_for(2)
    assert f"skipping checkpoint {newest}" in caplog.text and why in caplog.text
    if newest.with_suffix(".pt.sha256").exists():  # an explicit load refuses it too, naming it
        with pytest.raises(CheckpointError, match=str(newest)):
            load_checkpoint(newest)


def test_no_valid_checkpoint_at_all_starts_fresh_with_warnings(tmp_path, caplog):
    ckpt = small_checkpoints(tmp_path)
    for step in (2, 4):
        DAMAGE["truncated to half"](ckpt.path_for(step))
    with caplog.at_level(logging.WARNING):
        assert ckpt.newest_valid() is None
    assert caplog.text.count("skipping checkpoint") == 2


@pytest.mark.slow
def test_resume_auto_skips_a_truncated_checkpoint_and_ends_bitwise_equal(shards, reference_one, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_one, run_dir)
    for name in ("metrics.jsonl", "test/metrics.json"):
        (run_dir / name).unlink()
    newest = checkpointer(run_dir).newest_valid()  # step 24, the end of the run
    newest.write_bytes(newest.read_bytes()[:4096])
    out = run(train_cmd(shards, run_dir, *ONE_RANK))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"skipping checkpoint {newest}: checksum mismatch" in out.stderr
    assert f"resumed from {run_dir / 'checkpoints/step-00000012.pt'}" in out.stderr
    assert_same_run(reference_one, run_dir)


# ---------------------------------------------------------------------------------------------
# Disk full while writing a checkpoint


@pytest.mark.slow
def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_previous(shards, reference_one, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_one, run_dir)
    folder = run_dir / "checkpoints"
    for name in ("step-00000024.pt", "step-00000024.pt.sha256"):  # as if killed before the run's end
        (folder / name).unlink()
    before = {p.name: sha256_file(p) for p in folder.iterdir()}
    # The run resumes from step 12; its checkpoint of step 24 (17 MB) does not fit under 1 MB.
    out = subprocess.run(
        train_cmd(shards, run_dir, *ONE_RANK),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        preexec_fn=limit_file_size(1 << 20),
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "resumed from" in out.stderr
    assert (
        f"error: {folder / 'step-00000024.pt'}: cannot write checkpoint (File too large); "
        "the previous checkpoints are untouched" in out.stderr
    )
    no_traceback(out.stderr)
    assert {p.name: sha256_file(p) for p in folder.iterdir()} == before  # no partial or temp file either
    assert checkpointer(run_dir).is_valid(folder / "step-00000012.pt") == (True, "")
    assert load_checkpoint(checkpointer(run_dir).newest_valid())["step"] == 12


def test_disk_full_on_the_checksum_or_best_copy_never_leaves_a_valid_looking_partial(tmp_path, monkeypatch):
    """The data is written first and the checksum last: whichever write fails, what is on disk under
    a final name is either complete and checksummed, or has no checksum (and is skipped)."""
    import histo_dist.checkpoint as ck

    ckpt = small_checkpoints(tmp_path, steps=(2,))
    real = ck._write
    for fail_on in (".pt.sha256", "best.pt"):

        def failing(path, write, fail_on=fail_on):
            if path.name.endswith(fail_on):
                raise OSError(28, "No space left on device")
            return real(path, write)

        monkeypatch.setattr(ck, "_write", failing)
        with pytest.raises(CheckpointError, match="No space left on device"):
            ckpt.save(4, {"step": 4}, is_best=True)
        monkeypatch.setattr(ck, "_write", real)
        assert ckpt.newest_valid() in (ckpt.path_for(2), ckpt.path_for(4))
        assert load_checkpoint(ckpt.newest_valid())["step"] in (2, 4)
        assert not list(tmp_path.glob(".*.partial"))  # no temporary file left behind
        assert not (tmp_path / "best.pt").exists() or ckpt.is_valid(tmp_path / "best.pt")[0]


# ---------------------------------------------------------------------------------------------
# Weights-only loading: a file that would run code when unpickled


class _Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_checkpoint(path, marker, legacy: bool = False):
    state = {"step": 99, "model": {"w": torch.zeros(3)}, "optimizer": _Payload(marker)}
    if legacy:  # a plain pickle file, not torch's zip format
        path.write_bytes(pickle.dumps(state, protocol=2))
    else:
        torch.save(state, path)
    digest = sha256_file(path)  # a matching checksum: only weights-only loading stands between it and the code
    path.with_suffix(".pt.sha256").write_text(f"{digest}  {path.name}\n")


@pytest.mark.parametrize("legacy", [False, True], ids=["torch zip", "plain pickle"])
def test_loading_never_runs_code_from_the_file(tmp_path, legacy):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "step-00000099.pt"
    malicious_checkpoint(evil, marker, legacy)
    with pytest.raises(CheckpointError, match=rf"{evil}: refused: it holds more than tensors") as info:
        load_checkpoint(evil)
    assert "False" not in str(info.value)  # torch's advice to load with weights_only=False is not passed on
    from histo_dist.models import ModelConfig, ModelError, build_model

    with pytest.raises(ModelError, match=str(evil)):  # as pretrained weights: refused as well
        build_model(ModelConfig(name="simple_cnn", pretrained=str(evil)), 2)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    pickle.loads(evil.read_bytes()) if legacy else torch.load(evil, weights_only=False)
    assert marker.exists()


def test_resume_auto_never_runs_code_from_a_checkpoint(shards, tmp_path, keep_signal_handlers):
    from histo_dist.experiment import load_experiment
    from histo_dist.train import train

    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    evil = run_dir / "checkpoints/step-00000099.pt"
    malicious_checkpoint(evil, marker)
    cfg = load_experiment(
        None,
        [
            f"data.shards={shards}",
            "loader.batch_size=16",
            "loader.num_workers=0",
            "tracking.wandb=false",
            "tracking.progress=false",
            "model.name=simple_cnn",
        ],
    )
    with pytest.raises(CheckpointError, match=str(evil)):
        train(cfg, run_dir)
    assert not marker.exists()
