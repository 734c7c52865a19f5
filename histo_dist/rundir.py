"""The run directory: where a training run keeps what it did, and how it was made.

    RUN/config.yaml        the resolved config (every default filled in)
    RUN/provenance.json    code (git commit, dirty flag), package versions, host, devices, data identity
    RUN/metrics.jsonl      one JSON record per log, validation and test (tracking.RunLog)
    RUN/checkpoints/       step-*.pt (+ .sha256) and best.pt (checkpoint.Checkpointer)
    RUN/test/              the best checkpoint's test evaluation: metrics.json, predictions.csv, plots
    RUN/wandb/             the W&B run, when tracking.wandb is on
    RUN/run.lock           while a run is live: who holds the directory (host, pid, start time)

Only the main process writes here, and only while it holds the lock.

The lock (`RunLock`) is a file created with `os.link` from a complete temporary file: link creation
is atomic on local disks and on the shared filesystems of clusters (NFS, Lustre, GPFS), where
`fcntl`/`flock` locks are unreliable or not shared between hosts, and the lock's content is
complete the moment it exists. A lock whose holder is gone is stale and taken over with a warning:
on the same host when the holder's process no longer exists (pid and process start time), from
another host when its heartbeat, the lock file's mtime that the holder touches every
`HEARTBEAT_S` seconds, is older than `LEASE_S` (so the hosts' clocks must agree to within minutes).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from histo_dist.config import dump_yaml
from histo_dist.errors import HistoDistError
from histo_dist.files import check_output, partial_name, sha256_file, write_atomic
from histo_dist.manifest import Manifest

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
"""How often the holder touches its lock file."""
LEASE_S = 300.0
"""A lock held from another host is stale after this long without a heartbeat."""
BREAK_LEASE_S = 60.0
"""A `.run.lock.break` file (one start at a time removes a stale lock) older than this was left by a dead start."""


class RunDirError(HistoDistError):
    """A run directory that cannot be used as asked; names it, and the way forward."""


def default_run_dir(config_path: str | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def provenance(*, world_size: int, device_type: str, mixed_precision: str, manifest: Manifest) -> dict[str, Any]:
    """Code, versions, hardware and data identity of a run."""
    import importlib.metadata
    import platform
    import socket
    import subprocess
    import sys

    import torch

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
            return out.stdout.strip() if out.returncode == 0 else None
        except OSError:
            return None

    packages = {}
    for name in (
        "histo-dist",
        "torch",
        "torchvision",
        "timm",
        "accelerate",
        "webdataset",
        "torchmetrics",
        "wandb",
        "numpy",
        "h5py",
    ):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    status = git("status", "--porcelain")
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device_type == "cuda"
        else [platform.processor() or platform.machine()]
    )
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "command": sys.argv,
        "python": sys.version.split()[0],
        "packages": packages,
        "host": socket.gethostname(),
        "world_size": world_size,
        "device_type": device_type,
        "devices": devices,
        "mixed_precision": mixed_precision,
        "manifest": str(manifest.root / "manifest.json"),
        "manifest_sha256": sha256_file(manifest.root / "manifest.json"),
    }


def write_run_files(run_dir: Path, cfg: Any, provenance_record: dict[str, Any]) -> None:
    """config.yaml and provenance.json (main process only), once every check of the start has passed."""
    dump_yaml(cfg, run_dir / "config.yaml")
    write_atomic(run_dir / "provenance.json", json.dumps(provenance_record, indent=2) + "\n")


RUN_FILES = ("config.yaml", "provenance.json", "metrics.jsonl", "plan.json", "checkpoints", "test", "wandb")
"""What a run leaves in its directory: a directory holding any of them belongs to that run."""


def earlier_run(run_dir: Path) -> list[str]:
    """The files and (non-empty) folders of an earlier run in `run_dir`; [] when it holds none."""
    return [
        name
        for name in RUN_FILES
        if (run_dir / name).is_file() or ((run_dir / name).is_dir() and any((run_dir / name).iterdir()))
    ]


class RunDirClaim:
    """`run_dir` for one start of a run: checked, created when missing, and locked by `take()` (on the
    main process only). Until `started()`, the start may still be refused; `close()` then leaves the
    directory as it found it: the lock gone, and the folders this start created removed."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.lock: RunLock | None = None
        self.created: list[Path] = []
        self.is_started = False

    def take(self) -> None:
        check_output(self.run_dir, "--run-dir", "folder")
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"--run-dir {self.run_dir}: cannot create it ({e.strerror or e})") from None
        self.created = missing
        self.lock = RunLock(self.run_dir).acquire()

    def started(self) -> None:
        """Every check passed: from here on the directory holds this run."""
        self.is_started = True

    def move_earlier_run_aside(self) -> Path:
        """(--fresh) Rename the directory to RUN.old-<time> and take a new, empty one with its own lock."""
        aside = self.run_dir.with_name(f"{self.run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{self.run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        try:
            self.run_dir.rename(aside)
            self.run_dir.mkdir()
        except OSError as e:
            raise RunDirError(f"--fresh: cannot move {self.run_dir} aside to {aside} ({e.strerror or e})") from None
        self.lock.path = aside / LOCK_NAME  # moved with the directory
        self.lock.release()
        self.lock = RunLock(self.run_dir).acquire()
        log.warning("--fresh: moved the earlier run in %s aside to %s", self.run_dir, aside)
        return aside

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if not self.is_started:
            for folder in self.created:  # innermost first
                try:
                    folder.rmdir()
                except OSError:  # not empty (another run's files, or another start's): not ours to remove
                    break


# ---------------------------------------------------------------------------------------------
# The lock: one live run per directory


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid from its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """The lock of one run directory, held by this process until `release`; a thread keeps its heartbeat."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; a live holder is a `RunDirError` naming it."""
        for _ in range(20):  # some rounds: other starts may be taking over the same stale lock
            if self._create():
                self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            if holder is None:  # released in the meantime
                continue
            stale = self._stale(holder)
            if stale is None:
                raise RunDirError(
                    f"{self.path.parent}: in use by another run ({_describe(holder)}); wait for it to end or "
                    f"give another --run-dir (the lock {self.path} is taken over once that run is gone)"
                )
            log.warning("taking over the stale lock %s of %s: %s", self.path, _describe(holder), stale)
            self._break(holder)
        raise RunDirError(f"{self.path}: could not take the lock (other runs keep starting here); try again")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder is not None and holder.get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)

    def _create(self, path: Path | None = None) -> bool:
        """Create `path` (the lock) holding our record, only if it does not exist: os.link, atomic on NFS and
        Lustre too. False when it exists."""
        path = path or self.path
        tmp = partial_name(path)
        try:
            tmp.write_text(json.dumps(self.me) + "\n")
            try:
                os.link(tmp, path)
            except FileExistsError:
                # NFS: a retried link whose first attempt succeeded reports EEXIST; the link count tells.
                return os.stat(tmp).st_nlink == 2
            return True
        except OSError as e:
            raise RunDirError(f"{self.path.parent}: cannot write the run's lock there ({e.strerror or e})") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        """The holder's record (None when there is no lock); a foreign or damaged file's text is its token."""
        path = path or self.path
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RunDirError(f"{path}: cannot read the run's lock ({e.strerror or e})") from None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            holder = None
        return holder if isinstance(holder, dict) else {"token": text}

    def _stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None while it may be alive."""
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            pid = holder["pid"]
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"process {pid} no longer exists on this host"
            except PermissionError:  # alive, another user's
                pass
            start = _process_start(pid)
            if start is not None and holder.get("pid_start") is not None and start != holder["pid_start"]:
                return f"pid {pid} now belongs to another process"
            return None
        try:
            quiet = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "released"
        return f"no heartbeat for {quiet:.0f} s (lease {LEASE_S:.0f} s)" if quiet > LEASE_S else None

    def _break(self, holder: dict[str, Any]) -> None:
        """Remove the stale lock `holder` described, never a newer one another start took meanwhile. One start
        at a time breaks: it holds `.run.lock.break` (created like the lock), and removes the lock only if
        it still holds the stale holder's token; no other start can replace the lock while it exists. (Moving
        the lock aside instead lets a start's fresh lock be moved, and another start take the empty name: two
        winners.) A break file older than BREAK_LEASE_S, whose start died while breaking, is removed."""
        guard = self.path.with_name(f".{LOCK_NAME}.break")
        if not self._create(guard):
            try:
                if time.time() - guard.stat().st_mtime > BREAK_LEASE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)  # another start is breaking it: look again
            return
        try:
            current = self._read()
            if current is not None and current.get("token") == holder.get("token"):
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("cannot touch the run's lock %s (%s); another start may take it over", self.path, e)
