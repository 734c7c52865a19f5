"""Checkpoints: the one module that writes, validates and reads them, for training and inference.

A checkpoint is one file `checkpoints/step-00001234.pt` holding plain containers of tensors and
numbers (loadable with `torch.load(weights_only=True)`, which never runs code from the file), plus
a `.sha256` file next to it. Both are written atomically (`files.atomic_open`), data first: a
checkpoint counts as valid only when its checksum file exists and matches, so one cut short by a
kill or a full disk is never taken for complete. `resume=auto` takes the newest valid checkpoint
and names, with a warning, each newer one it skips.

Kept: the last `keep_last` checkpoints plus `best.pt` (a copy of the best by the validation metric).

The format (`FORMAT`): a dict with `step`, `model` (the unwrapped model's state dict), `config` (the
run's resolved config), `num_classes`, `label_names`, `image_shape`, and for resuming `optimizer`,
`scheduler`, `loader`, `best`, `evals_without_improvement`, `skipped_samples`, optionally `ema`
(torch's AveragedModel state) and `scaler`. `read_training_checkpoint` checks it and names the file;
`model_weights` picks the model's or the EMA weights out of it.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from histo_dist.errors import HistoDistError
from histo_dist.files import atomic_open, sha256_file

log = logging.getLogger(__name__)
FORMAT = "histo-dist-checkpoint-1"
REQUIRED_KEYS = ("model", "config", "num_classes")
"""What inference needs; a training resume also needs what `Trainer.load` reads."""
STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes that wrappers add: DistributedDataParallel and AveragedModel (module.), torch.compile (_orig_mod.)."""


class CheckpointError(HistoDistError):
    """A checkpoint that cannot be written or read; names the file."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0: only at the end of each epoch and after each validation)."""
    keep_last: int = 2
    """How many of the newest step checkpoints to keep (the best one is kept besides)."""
    resume: str = "auto"
    """'auto' continues the run in the run directory from its newest valid checkpoint (a new run when the directory
    holds none), 'never' starts a new run (refused in a directory holding one: see --fresh), or a checkpoint file to
    continue (another run's: into a new run directory). The config may differ only in values that apply on resume
    (tracking, test, checkpoint, train.eval_every_steps, loader.eval_batch_size); for other changes start a new run
    from the weights with model.init_from."""

    def validate(self) -> list[str]:
        problems = []
        if self.every_steps < 0:
            problems.append(f"every_steps: must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            problems.append(f"keep_last: must be >= 1, got {self.keep_last}")
        return problems


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: torch.save reports a failed write (full disk, file size limit) as a
    RuntimeError raised while handling the OSError of the file object."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def _write(path: Path, write: Callable) -> None:
    try:
        with atomic_open(path, "wb") as f:
            write(f)
    except BaseException as e:
        error = _os_error(e)
        if error is None:
            raise
        raise CheckpointError(
            f"{path}: cannot write checkpoint ({error.strerror or error}); the previous checkpoints are untouched"
        ) from None


class Checkpointer:
    """Decides when to save, saves, and finds checkpoints in `folder`. Only the main process saves."""

    def __init__(self, folder: str | Path, cfg: CheckpointConfig):
        self.folder = Path(folder)
        self.cfg = cfg
        self.last_saved_step: int | None = None

    def due(self, step: int, *, end_of_epoch: bool = False, validated: bool = False, last_step: bool = False) -> bool:
        """Whether the checkpoint of `step` should be written: after every validation (it may be the new
        best), at the end of every epoch and of the run, and every `every_steps` steps."""
        every = self.cfg.every_steps
        return validated or end_of_epoch or last_step or bool(every and step % every == 0)

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:08d}.pt"

    def save(self, step: int, state: dict[str, Any], is_best: bool = False) -> Path:
        """Write the checkpoint of `step` (and best.pt), then prune old ones. Errors name the file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path_for(step)
        state = {"format": FORMAT, **state}
        try:
            _write(path, lambda f: torch.save(state, f))
            digest = sha256_file(path)
            _write(path.with_suffix(".pt.sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))
            if is_best:
                best = self.folder / "best.pt"
                _write(best, lambda f: f.write(path.read_bytes()))
                _write(best.with_suffix(".pt.sha256"), lambda f: f.write(f"{digest}  best.pt\n".encode()))
        except OSError as e:  # reading the checkpoint back for its checksum or the best copy
            raise CheckpointError(
                f"{path}: cannot write checkpoint ({e.strerror or e}); the previous checkpoints are untouched"
            ) from None
        self._prune()
        self.last_saved_step = step
        return path

    def _prune(self) -> None:
        steps = sorted(self.step_paths())
        for p in steps[: max(0, len(steps) - self.cfg.keep_last)]:
            p.unlink(missing_ok=True)
            p.with_suffix(".pt.sha256").unlink(missing_ok=True)

    def step_paths(self) -> list[Path]:
        return (
            sorted(p for p in self.folder.glob("step-*.pt") if STEP_FILE.match(p.name)) if self.folder.exists() else []
        )

    @staticmethod
    def is_valid(path: Path) -> tuple[bool, str]:
        """(valid, reason): complete means its .sha256 file exists and matches its bytes."""
        sums = path.with_suffix(".pt.sha256")
        if not sums.exists():
            return False, "no checksum file (it was cut short while being written)"
        expected = sums.read_text().split()[0] if sums.read_text().strip() else ""
        if sha256_file(path) != expected:
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
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a folder; give a checkpoint file such as RUN/checkpoints/best.pt") from None
    except PermissionError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror})") from None
    except pickle.UnpicklingError as e:  # torch's text suggests weights_only=False: never, for a file it refused
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"{path}: refused: it holds more than tensors and plain containers ({detail or type(e).__name__}); "
            "checkpoints are loaded weights-only, so no code in a file ever runs. Not a histo-dist checkpoint, "
            "or not from a trusted source"
        ) from None
    except Exception as e:  # unpickling errors, truncation, refused globals
        raise CheckpointError(f"{path}: not a loadable histo-dist checkpoint ({type(e).__name__}: {e})") from None


def read_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """`load_checkpoint`, checked to be one the trainer wrote; every problem names the file."""
    path = Path(path)
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a histo-dist training checkpoint (a {type(state).__name__}, not a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a histo-dist training checkpoint: no {', '.join(repr(k) for k in missing)} "
            f"(it has {', '.join(map(repr, list(state)[:8])) or 'nothing'}); pass RUN/checkpoints/best.pt or a "
            "step-*.pt file"
        )
    return state


def strip_prefixes(
    state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = WRAPPER_PREFIXES
) -> dict[str, torch.Tensor]:
    """Keys without the prefixes wrappers add (repeatedly: a compiled model inside DDP has both)."""
    out = {}
    for key, value in state.items():
        while key.startswith(prefixes):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def model_weights(state: dict[str, Any], which: Literal["auto", "model", "ema"], path: str | Path) -> tuple[dict, str]:
    """(state dict of the plain model, 'model' or 'ema'): 'auto' takes the EMA average when the run kept one."""
    if which == "auto":
        which = "ema" if state.get("ema") is not None else "model"
    if which == "ema":
        if state.get("ema") is None:
            raise CheckpointError(f"{path}: has no EMA weights (the run had train.ema_decay=0); use --weights model")
        return strip_prefixes({k: v for k, v in state["ema"].items() if k != "n_averaged"}), "ema"
    return strip_prefixes(state["model"]), "model"
