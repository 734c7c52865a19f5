"""A run directory belongs to one run: its lock, held by a live run, taken over from a gone one."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from histo_dist.rundir import LEASE_S, LOCK_NAME, RunDirError, RunLock

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
