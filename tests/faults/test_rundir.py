"""A run directory belongs to one run: two runs started on it, a run that resumes with another
config, a start that is refused, `checkpoint.resume=never` on an earlier run, a killed run's lock.

Real `histo-dist train` processes where the process matters (the lock, the one-line errors, several
ranks); `train()` in this process where only what a start leaves behind does.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from histo_dist.checkpoint import load_checkpoint
from histo_dist.errors import HistoDistError
from histo_dist.files import sha256_file
from histo_dist.rundir import LEASE_S, LOCK_NAME, RunDirError, RunLock
from histo_dist.tracking import keep_records_until
from tests.faults.harness import BASE, ONE_RANK, no_traceback, train_cmd
from tests.runs import (
    ROOT,
    assert_same_run,
    assert_same_weights,
    final_state,
    logged_step,
    records,
    run,
    start,
    wait_for,
)


def snapshot(folder: Path) -> dict[str, str] | None:
    """{relative path: sha256, or 'folder'} of everything under `folder`, hidden files included (None: absent)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): "folder" if p.is_dir() else sha256_file(p) for p in sorted(folder.rglob("*"))}


def config(shards: Path, *overrides: str):
    """The config of the fault suite's single-process run (`reference_one`), with `overrides`."""
    from histo_dist.experiment import load_experiment

    return load_experiment(ROOT / "configs/cpu_test.yaml", [f"data.shards={shards}", *BASE, *ONE_RANK, *overrides])


QUICK = ("train.max_steps=2", "schedule.warmup_steps=1", "data.test_split=")
"""A new run of two steps, validated at the end, without a test."""


def interrupted_copy(reference: Path, tmp_path: Path) -> Path:
    """The finished reference run as if killed after its checkpoint of step 12: it resumes there."""
    run_dir = Path(shutil.copytree(reference, tmp_path / "run"))
    for name in ("step-00000024.pt", "step-00000024.pt.sha256"):
        (run_dir / "checkpoints" / name).unlink()
    keep_records_until(run_dir / "metrics.jsonl", 12)
    shutil.rmtree(run_dir / "test")
    return run_dir


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The lock


def write_lock(run_dir: Path, age_s: float = 0.0, **holder) -> Path:
    """A lock file as another run writes it, its last heartbeat `age_s` ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    record = {"host": "node-17", "pid": 4242, "pid_start": "1", "started": "2024-01-01 00:00:00 UTC", "token": "x"}
    lock.write_text(json.dumps({**record, **holder}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_live_holder_is_named_and_a_gone_one_is_taken_over(tmp_path, caplog):
    me = socket.gethostname()
    live = {
        "another host, heartbeat 10 s ago": dict(host="node-17", age_s=10),
        "this process": dict(host=me, pid=os.getpid(), pid_start=RunLock(tmp_path).me["pid_start"]),
    }
    for why, holder in live.items():
        lock = write_lock(tmp_path / why, **holder)
        before = lock.read_bytes()
        with pytest.raises(RunDirError, match=rf"in use by another run \(pid {holder.get('pid', 4242)} on host "):
            RunLock(tmp_path / why).acquire()
        assert lock.read_bytes() == before, why
    gone = {
        "no heartbeat for longer than the lease": (dict(host="node-17", age_s=LEASE_S + 60), "no heartbeat for"),
        "its process is gone": (dict(host=me, pid=2**22 + 7), "no longer exists on this host"),
        "its pid was reused": (dict(host=me, pid=os.getpid(), pid_start="0"), "now belongs to another process"),
        "not a lock this version wrote": (dict(host="node-17", age_s=LEASE_S + 60, token=None), "no heartbeat"),
    }
    for why, (holder, message) in gone.items():
        write_lock(tmp_path / why, **holder)
        with caplog.at_level(logging.WARNING):
            lock = RunLock(tmp_path / why).acquire()
        assert message in caplog.text, why
        assert json.loads((tmp_path / why / LOCK_NAME).read_text())["token"] == lock.me["token"]
        lock.release()
        assert not (tmp_path / why / LOCK_NAME).exists()


def test_only_one_of_many_simultaneous_starts_takes_a_stale_lock(tmp_path):
    """Every start sees the stale lock and removes it; the lock it creates after that is link()ed, so
    exactly one wins, and no start removes the lock another start took meanwhile."""
    write_lock(tmp_path, host=socket.gethostname(), pid=2**22 + 7)
    barrier, won, refused = threading.Barrier(8), [], []

    def contend():
        barrier.wait()
        try:
            won.append(RunLock(tmp_path).acquire())
        except RunDirError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7, refused
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == won[0].me["token"]
    assert not [p for p in tmp_path.iterdir() if p.name != LOCK_NAME]  # no temporary or stale file left
    won[0].release()


def test_the_holder_keeps_a_heartbeat_and_releases_only_its_own_lock(tmp_path, monkeypatch):
    import histo_dist.rundir as rundir

    monkeypatch.setattr(rundir, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (0, 0))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime < time.time() - 60:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.05)
    write_lock(tmp_path, host="node-3")  # taken over by another start (wrongly): not ours to remove
    lock.release()
    assert json.loads(path.read_text())["host"] == "node-3"


# ---------------------------------------------------------------------------------------------
# Two commands on one run directory


@pytest.mark.slow
def test_a_second_run_on_a_live_run_directory_fails_at_once_and_a_killed_runs_lock_is_taken_over(
    shards, reference_one, tmp_path
):
    """The issue's case: a second command (another lr) a moment later. It used to run too: every
    metrics.jsonl line twice, a resume from the first run's mid-run checkpoint, a config.yaml neither
    used. Now it stops at once naming the holder, on one rank or two. The first run, stopped there
    (SIGSTOP: alive, holding the lock), is then killed; the same command takes its lock over, resumes,
    and ends as the uninterrupted run did, with one run's metrics.jsonl."""
    run_dir = tmp_path / "run"
    cmd = train_cmd(shards, run_dir, *ONE_RANK)
    first = start(cmd)
    try:
        wait_for(lambda: logged_step(run_dir) >= 14, first)  # past its checkpoint of step 12
        os.killpg(first.pid, signal.SIGSTOP)
        holder = f"in use by another run (pid {first.pid} on host {socket.gethostname()}, started "
        for ranks in (1, 2):
            t0 = time.monotonic()
            second = run(train_cmd(shards, run_dir, *ONE_RANK, "optim.lr=0.0001", ranks=ranks))
            elapsed = time.monotonic() - t0
            assert second.returncode != 0
            assert f"histo-dist train: error: {run_dir}: {holder}" in second.stderr, second.stderr[-3000:]
            if ranks == 1:  # (torchrun reports a failed rank with a traceback of its own)
                error_line(second.stderr)
                no_traceback(second.stderr)
            print(f"{ranks} rank(s): refused after {elapsed:.1f} s (imports included)")
            assert elapsed < 120
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == first.pid  # left behind by the kill

    out = run(cmd)  # the same command: takes the dead run's lock over and resumes
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"taking over the stale lock {run_dir / LOCK_NAME} of pid {first.pid} on host" in out.stderr
    assert f"resumed from {run_dir / 'checkpoints/step-00000012.pt'}" in out.stderr
    assert not (run_dir / LOCK_NAME).exists()
    assert_same_run(reference_one, run_dir)
    assert [(r["kind"], r["step"]) for r in records(run_dir)] == [
        (r["kind"], r["step"]) for r in records(reference_one)
    ]
    assert "lr: 0.002" in (run_dir / "config.yaml").read_text()


# ---------------------------------------------------------------------------------------------
# Resuming with another config


@pytest.mark.slow
def test_a_resume_with_changed_values_is_refused_naming_them_and_writes_nothing(shards, reference_one, tmp_path):
    """optim.lr was ignored (the restored schedule went on) while config.yaml said the new value;
    loader.shuffle_buffer was refused by the loader after config.yaml and provenance.json had been
    overwritten. Now both are named, with the way forward, before anything is written."""
    run_dir = interrupted_copy(reference_one, tmp_path)
    before = snapshot(run_dir)
    out = run(train_cmd(shards, run_dir, *ONE_RANK, "optim.lr=0.0001", "loader.shuffle_buffer=32"))
    assert out.returncode == 2
    line = error_line(out.stderr)
    checkpoint = run_dir / "checkpoints/step-00000012.pt"
    assert f"error: {checkpoint}: cannot resume with " in line
    assert "loader.shuffle_buffer: 64 -> 32" in line and "optim.lr: 0.002 -> 0.0001" in line
    assert f"--run-dir NEW_DIR model.init_from={checkpoint}" in line
    no_traceback(out.stderr)
    assert snapshot(run_dir) == before
    # The original command still resumes.
    out = run(train_cmd(shards, run_dir, *ONE_RANK))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_weights(final_state(reference_one)["model"], final_state(run_dir)["model"])


@pytest.mark.slow
def test_a_resume_on_ranks_that_cannot_keep_the_global_batch_is_refused_on_every_rank_and_writes_nothing(
    shards, reference_one, tmp_path
):
    run_dir = interrupted_copy(reference_one, tmp_path)
    before = snapshot(run_dir)
    out = run(train_cmd(shards, run_dir, *ONE_RANK, ranks=2), timeout=300)
    assert out.returncode != 0
    # 16 per step on one rank; two ranks of loader.batch_size=16 cannot make 16 (elastic resume needs 8 x 1).
    assert "its global batch is 16" in out.stderr and "loader.batch_size=8 train.grad_accum_steps=1" in out.stderr
    assert "model.init_from=" in out.stderr, out.stderr[-3000:]
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_values_that_may_change_on_resume_apply_and_are_listed(shards, reference_one, tmp_path):
    run_dir = interrupted_copy(reference_one, tmp_path)
    changes = [
        "tracking.log_every_steps=3",
        "train.eval_every_steps=6",
        "checkpoint.keep_last=3",
        "loader.eval_batch_size=16",
        "test.tta=true",
    ]
    out = run(train_cmd(shards, run_dir, *ONE_RANK, *changes))
    assert out.returncode == 0, out.stderr[-3000:]
    (listed,) = [line for line in out.stderr.splitlines() if "resuming with changed settings" in line]
    for change in ("tracking.log_every_steps: 2 -> 3", "train.eval_every_steps: 0 -> 6", "test.tta: False -> True"):
        assert change in listed
    saved = (run_dir / "config.yaml").read_text()
    assert "log_every_steps: 3" in saved and "eval_every_steps: 6" in saved and "keep_last: 3" in saved
    assert [r["step"] for r in records(run_dir, "valid")] == [12, 18, 24]  # validated every 6 steps after 12
    assert [r["step"] for r in records(run_dir, "train")][-3:] == [18, 21, 24]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt")) == [
        f"step-{s:08d}.pt" for s in (12, 18, 24)
    ]
    assert "tta" in json.loads((run_dir / "test/metrics.json").read_text())
    # Training itself is as it was: the same weights as the uninterrupted run.
    assert_same_weights(final_state(reference_one)["model"], final_state(run_dir)["model"])


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(shards, reference_one, tmp_path):
    """The way forward the refusal names: a new run from the weights, with the new values."""
    from histo_dist.train import train

    source = reference_one / "checkpoints/step-00000012.pt"
    run_dir = tmp_path / "new"
    cfg = config(shards, *QUICK, f"model.init_from={source}", "optim.lr=1e-12")
    train(cfg, run_dir)
    state = final_state(run_dir)
    assert state["step"] == 2 and state["config"]["model"]["init_from"] == str(source)
    for key, value in load_checkpoint(source)["model"].items():  # (a learning rate of 1e-12 moves nothing)
        assert torch.allclose(value.float(), state["model"][key].float(), atol=1e-6), key
    assert [r["step"] for r in records(run_dir, "train")] == [2]  # its own history from step 0


def test_init_from_names_a_checkpoint_that_does_not_fit(reference_one, tmp_path):
    from histo_dist.config import ConfigError
    from histo_dist.experiment import load_experiment
    from histo_dist.models import ModelConfig, ModelError, build_model

    source = reference_one / "checkpoints/best.pt"
    with pytest.raises(ModelError, match=rf"init_from={source}: its simple_cnn model for 2 classes does not fit "):
        build_model(ModelConfig(name="compact_cnn", init_from=str(source)), 2)
    with pytest.raises(ModelError, match=r"for 3 classes: shape mismatch \(2\): net.fc.1.weight"):
        build_model(ModelConfig(init_from=str(source)), 3)
    with pytest.raises(ModelError, match=rf"init_from={tmp_path}: a folder; give a training checkpoint"):
        build_model(ModelConfig(init_from=str(tmp_path)), 2)
    (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HistoDistError, match=str(tmp_path / "weights.pt")):
        build_model(ModelConfig(init_from=str(tmp_path / "weights.pt")), 2)
    with pytest.raises(ConfigError, match=r"model.init_from: .* give one of them"):
        load_experiment(None, [f"model.init_from={source}", "model.pretrained=imagenet", "model.name=resnet18"])


# ---------------------------------------------------------------------------------------------
# Refused starts leave nothing; resume=never; --fresh


def test_resume_never_on_an_earlier_run_is_refused_and_fresh_moves_it_aside(shards, reference_one, tmp_path):
    """resume=never used to start a second run in the directory: keep-last deleted the earlier run's
    checkpoints and metrics.jsonl held two runs' records."""
    from histo_dist.train import train

    run_dir = Path(shutil.copytree(reference_one, tmp_path / "run"))
    before = snapshot(run_dir)
    with pytest.raises(
        RunDirError,
        match=rf"{run_dir}: holds an earlier run \(config.yaml, .*checkpoints.*\), and "
        "checkpoint.resume=never starts a new one: give a new --run-dir, or add --fresh",
    ):
        train(config(shards, "checkpoint.resume=never"), run_dir)
    assert snapshot(run_dir) == before
    with pytest.raises(RunDirError, match=r"--fresh starts a new run and checkpoint.resume=.* continues one"):
        train(config(shards, f"checkpoint.resume={run_dir}/checkpoints/best.pt"), run_dir, fresh=True)
    assert snapshot(run_dir) == before

    train(config(shards, *QUICK), run_dir, fresh=True)
    (aside,) = tmp_path.glob("run.old-*")
    assert snapshot(aside) == before  # the earlier run, whole
    assert [r["step"] for r in records(run_dir)] == [2, 2]  # the new run's own train and valid records
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt")) == ["step-00000002.pt"]


def test_resuming_another_runs_checkpoint_into_a_run_directory_is_refused(shards, reference_one, tmp_path):
    from histo_dist.train import train

    other = Path(shutil.copytree(reference_one, tmp_path / "other"))
    run_dir = Path(shutil.copytree(reference_one, tmp_path / "run"))
    before = snapshot(run_dir)
    with pytest.raises(RunDirError, match=r"holds an earlier run .* would mix the two: give a new --run-dir"):
        train(config(shards, f"checkpoint.resume={other}/checkpoints/step-00000012.pt"), run_dir)
    assert snapshot(run_dir) == before


def test_a_run_killed_before_its_first_checkpoint_starts_again_only_with_its_own_config(shards, tmp_path, caplog):
    from histo_dist.train import train

    run_dir = tmp_path / "run"
    train(config(shards, *QUICK), run_dir)
    shutil.rmtree(run_dir / "checkpoints")  # as if killed before its first checkpoint
    (run_dir / "checkpoints").mkdir()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # cut short by the kill
    before = snapshot(run_dir)
    with pytest.raises(HistoDistError, match=rf"{run_dir / 'config.yaml'}: cannot resume with optim.lr: 0.002 -> "):
        train(config(shards, *QUICK, "optim.lr=0.01"), run_dir)
    assert snapshot(run_dir) == before
    with caplog.at_level(logging.WARNING):
        train(config(shards, *QUICK), run_dir)
    assert "no valid checkpoint to resume from; the run starts again from step 0" in caplog.text
    assert [(r["kind"], r["step"]) for r in records(run_dir)] == [("train", 2), ("valid", 2)]


@pytest.mark.parametrize("where", ["new nested folders", "an existing empty folder"])
def test_a_refused_start_leaves_the_run_directory_as_it_was(shards, tmp_path, where):
    from histo_dist.train import train

    run_dir = tmp_path / "runs" / "a" / "run"
    if where == "an existing empty folder":
        run_dir.mkdir(parents=True)
    bad = tmp_path / "not-a-checkpoint.pt"
    bad.write_bytes(b"cut short")
    before = snapshot(tmp_path)
    with pytest.raises(HistoDistError, match=str(bad)):  # found once data and model are built
        train(config(shards, f"checkpoint.resume={bad}"), run_dir)
    assert snapshot(tmp_path) == before


def test_keep_records_until_drops_a_lost_continuation_and_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"kind": "train", "step": 10},
        {"kind": "valid", "step": 12},
        {"kind": "train", "step": 12},
        {"kind": "train", "step": 14},
        {"kind": "test", "step": 12},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra')
    keep_records_until(path, 12)
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]
