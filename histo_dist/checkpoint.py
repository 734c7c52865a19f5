"""Checkpoints: atomic, checksummed, pruned, and loaded without executing code.

A checkpoint is one file `checkpoints/step-00001234.pt` holding plain containers of tensors and
numbers (loadable with `torch.load(weights_only=True)`, which never runs code from the file), plus
a `.sha256` file next to it. Both are written under temp names and renamed, data first: a
checkpoint counts as valid only when its checksum file exists and matches, so one cut short by a
kill or a full disk is never taken for complete. `resume=auto` takes the newest valid checkpoint
and names, with a warning, each newer one it skips.

Kept: the last `keep_last` checkpoints plus `best.pt` (a copy of the best by the validation metric).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from histo_dist.errors import HistoDistError

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(HistoDistError):
    """A checkpoint that cannot be written or read; names the file."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end of each epoch)."""
    keep_last: int = 2
    """How many of the newest step checkpoints to keep (the best one is kept besides)."""
    resume: str = "auto"
    """'auto' continues from the newest valid checkpoint in the run directory (fresh start when none),
    'never' always starts fresh, or a path to a checkpoint file."""

    def validate(self) -> list[str]:
        problems = []
        if self.every_steps < 0:
            problems.append(f"every_steps: must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            problems.append(f"keep_last: must be >= 1, got {self.keep_last}")
        return problems


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: torch.save reports a failed write (full disk, file size limit) as a
    RuntimeError raised while handling the OSError of the file object."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def _write_then_rename(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        error = _os_error(e)
        if error is None:
            raise
        raise CheckpointError(
            f"{path}: cannot write checkpoint ({error.strerror or error}); the previous checkpoints are untouched"
        ) from None


class Checkpointer:
    """Saves and finds checkpoints in `folder`. Only the main process should call `save`."""

    def __init__(self, folder: str | Path, cfg: CheckpointConfig):
        self.folder = Path(folder)
        self.cfg = cfg

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def save(self, step: int, state: dict[str, Any], is_best: bool = False) -> Path:
        """Write the checkpoint of `step` (and best.pt), then prune old ones. Errors name the file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        try:
            _write_then_rename(path, lambda f: torch.save(state, f))
            digest = _sha256(path)
            _write_then_rename(path.with_suffix(".pt.sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
            if is_best:
                best = self.folder / "best.pt"
                _write_then_rename(best, lambda f: f.write(path.read_bytes()))
                _write_then_rename(best.with_suffix(".pt.sha256"), lambda f: f.write(f"{digest}  best.pt\n".encode()))
        except OSError as e:
            raise CheckpointError(
                f"{path}: cannot write checkpoint ({e.strerror or e}); the previous checkpoints are untouched"
            ) from None
        self._prune()
        return path

    def _prune(self) -> None:
        steps = sorted(self.step_paths())
        for p in steps[: max(0, len(steps) - self.cfg.keep_last)]:
            p.unlink(missing_ok=True)
            p.with_suffix(".pt.sha256").unlink(missing_ok=True)

    def step_paths(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("step-*.pt") if STEP_FILE.match(p.name)) if self.folder.exists() else []

    @staticmethod
    def is_valid(path: Path) -> tuple[bool, str]:
        """(valid, reason): complete means its .sha256 file exists and matches its bytes."""
        sums = path.with_suffix(".pt.sha256")
        if not sums.exists():
            return False, "no checksum file (it was cut short while being written)"
        expected = sums.read_text().split()[0] if sums.read_text().strip() else ""
        if _sha256(path) != expected:
            return False, "checksum mismatch (truncated or corrupted on disk)"
        return True, ""

    def newest_valid(self) -> Path | None:
        """The newest checkpoint that is complete; each newer invalid one is named in a warning."""
        for path in reversed(self.step_paths()):
            ok, why = self.is_valid(path)
            if ok:
                return path
            log.warning("skipping checkpoint %s: %s", path, why)
        return None

    def resume_path(self) -> Path | None:
        """What `resume` in the config points at: a file, the newest valid one, or None."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return self.newest_valid()
        path = Path(self.cfg.resume)
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume={path}: no such file")
        return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True: tensors and plain containers only, no code runs."""
    path = Path(path)
    sums = path.with_suffix(".pt.sha256")
    if sums.exists():
        ok, why = Checkpointer.is_valid(path)
        if not ok:
            raise CheckpointError(f"{path}: {why}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:  # torch's text suggests weights_only=False: never, for a file it refused
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: refused: it holds more than tensors and plain containers ({detail or type(e).__name__}); "
            "checkpoints are loaded weights-only, so no code in a file ever runs. Not a histo-dist checkpoint, "
            "or not from a trusted source"
        ) from None
    except Exception as e:  # unpickling errors, truncation, refused globals
        raise CheckpointError(f"{path}: not a loadable histo-dist checkpoint ({type(e).__name__}: {e})") from None
