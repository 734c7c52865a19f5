"""What a run leaves behind for people: metrics.jsonl, W&B (through Accelerate's trackers), logs.

Only the main process writes and logs; other ranks' calls are no-ops. W&B runs in the mode the
config or `WANDB_MODE` gives: `offline` writes a real run under the run directory with no network
(SLURM compute nodes); `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from histo_dist.files import write_atomic

log = logging.getLogger(__name__)


@dataclass
class TrackingConfig:
    wandb: bool = True
    """Log to Weights & Biases (config, losses, learning rate, images/s, validation metrics, plots)."""
    project: str = "histo-dist"
    """W&B project name."""
    run_name: str = ""
    """W&B run name; empty uses the run directory's name."""
    mode: Literal["env", "online", "offline", "disabled"] = "env"
    """W&B mode: 'env' follows WANDB_MODE (online when unset); 'offline' needs no network."""
    log_every_steps: int = 10
    """Log training loss, learning rate and images/s every N optimizer steps."""
    progress: bool = True
    """Show a tqdm progress bar on rank zero."""
    log_samples: bool = False
    """Append the keys each optimizer step trained on to RUN/samples.jsonl (epoch, step, keys of all ranks): which
    patches trained the model, for audits of the data order. Gathered to rank 0 at each log interval."""

    def validate(self) -> list[str]:
        return [] if self.log_every_steps >= 1 else [f"log_every_steps: must be >= 1, got {self.log_every_steps}"]


def setup_logging(rank: int, world_size: int) -> None:
    """Rank-prefixed log lines on stderr: `[rank 1/2] INFO histo_dist.train: ...`."""
    fmt = f"[rank {rank}/{world_size}] %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for h in root.handlers:
        h.setFormatter(logging.Formatter(fmt))
    if not root.handlers:
        logging.basicConfig(format=fmt)
    root.setLevel(logging.INFO)


class RunLog:
    """metrics.jsonl plus W&B on the main process; `accelerator.init_trackers` is called here."""

    def __init__(self, accelerator, run_dir: Path, cfg: TrackingConfig, config: dict[str, Any]):
        self.accelerator, self.run_dir, self.cfg = accelerator, run_dir, cfg
        self.main = accelerator.is_main_process
        self.wandb = (
            cfg.wandb and cfg.mode != "disabled" and (cfg.mode != "env" or os.environ.get("WANDB_MODE") != "disabled")
        )
        if self.main and self.wandb:
            init = {
                "dir": str(run_dir),
                "name": cfg.run_name or run_dir.name,
                "id": _stable_run_id(run_dir),
                "resume": "allow",
            }
            if cfg.mode in ("online", "offline"):
                init["mode"] = cfg.mode
            accelerator.init_trackers(cfg.project, config=config, init_kwargs={"wandb": init})
            try:
                _stop_import_telemetry(accelerator.get_tracker("wandb", unwrap=True))
            except Exception as e:  # noqa: BLE001 - a W&B without the private call: keep W&B, say what it risks
                log.warning(
                    "could not remove W&B's import hooks (%s: %s): a preemption may stop the run before "
                    "its checkpoint (wandb #9963)",
                    type(e).__name__,
                    e,
                )

    def log(self, values: dict[str, Any], step: int, kind: str) -> None:
        """Append one record to metrics.jsonl and send it to the trackers."""
        if not self.main:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self._to_wandb(
            lambda: self.accelerator.log(
                {f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step
            )
        )

    def log_images(self, images: dict[str, Path], step: int) -> None:
        def send():
            import wandb

            run = self.accelerator.get_tracker("wandb", unwrap=True)
            run.log({k: wandb.Image(str(p)) for k, p in images.items()}, step=step)

        self._to_wandb(send)

    def summary(self, values: dict[str, Any]) -> None:
        def send():
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            for k, v in values.items():
                run.summary[k] = v

        self._to_wandb(send)

    def _to_wandb(self, send) -> None:
        """W&B is for people watching; a failure there (its service dies on SIGTERM, wandb #9963)
        must not stop training or a preemption checkpoint. metrics.jsonl keeps everything."""
        if not (self.main and self.wandb):
            return
        try:
            send()
        except Exception as e:  # noqa: BLE001 - any tracker failure
            self.wandb = False
            log.warning(
                "W&B logging failed (%s: %s); continuing without it (metrics.jsonl has every record)",
                type(e).__name__,
                e,
            )


def _stop_import_telemetry(run) -> None:
    """Remove W&B's import hooks for `run`. W&B reports which libraries a run imports (its own usage telemetry, not
    the user's data) from a hook that sends to its service from inside the `import` statement that first loads one
    of them, where no guard of ours can be. A preemption's SIGTERM kills that service (wandb #9963), and the next
    such import (torchmetrics loads torchvision at the first validation) raised ConnectionResetError before the
    preemption checkpoint was written: 4 of 7 real-SLURM preemptions with W&B on (2026-12-01). W&B's private
    `Run._unregister_telemetry_import_hooks` is what `Run.finish` calls; a W&B without it gets a warning."""
    from wandb.sdk.wandb_run import Run

    Run._unregister_telemetry_import_hooks(run.id)


def keep_records_until(path: Path, step: int) -> None:
    """Cut metrics.jsonl back to the checkpoint of `step` a run resumes from (0: a run started again): the
    records of the lost continuation after it (later steps, and the final test, which follows the last
    checkpoint) and a line cut short by a kill go, so the file reads as one run's history, as an
    uninterrupted run writes it, not two attempts interleaved."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("step", 0) < step or (record.get("step") == step and record.get("kind") != "test"):
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) < len(lines):
        write_atomic(path, "".join(kept))
        log.info(
            "%s: %d records after step %d dropped (the attempt that logged them was lost)",
            path,
            len(lines) - len(kept),
            step,
        )


def _stable_run_id(run_dir: Path) -> str:
    """The same W&B run id for the same run directory, so a resumed (requeued) run continues it."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
