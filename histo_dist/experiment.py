"""The schema of a training run: one section per component, each passed only to its owner.

    data      DataConfig        which shards and splits               (the trainer)
    loader    LoaderConfig      per-rank streaming loaders            (loader.py)
    augment   AugmentConfig     per-sample augmentation               (augment.py)
    model     ModelConfig       architecture and weights              (models.py)
    loss      LossConfig        the training loss                     (the trainer)
    optim     OptimConfig       optimizer                             (optim.py)
    schedule  ScheduleConfig    learning-rate schedule                (optim.py)
    train     TrainConfig       the loop: length, precision, cadence  (the trainer)
    test      EvalOptions       the best checkpoint's test evaluation (evaluation.py)
    checkpoint CheckpointConfig saving and resuming                   (checkpoint.py)
    tracking  TrackingConfig    metrics.jsonl, W&B, progress bar      (tracking.py)

`histo-dist train --help-config [SECTION]` prints every field with its type, default and doc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from histo_dist.augment import AugmentConfig
from histo_dist.budget import MIN_CALIBRATION_STEPS, BudgetError, parse_duration
from histo_dist.checkpoint import CheckpointConfig
from histo_dist.config import load_config, to_dict
from histo_dist.evaluation import EvalOptions
from histo_dist.loader import LoaderConfig
from histo_dist.metrics import METRIC_NAMES
from histo_dist.models import ModelConfig
from histo_dist.optim import OptimConfig, ScheduleConfig
from histo_dist.tracking import TrackingConfig


@dataclass
class DataConfig:
    shards: str = "shards/pcam"
    """Folder with manifest.json and the shards (written by `histo-dist convert`)."""
    train_split: str = "train"
    """Split to train on."""
    valid_split: str = "valid"
    """Split for validation during training, for choosing the best checkpoint and the test threshold."""
    test_split: str = "test"
    """Split the best checkpoint is evaluated on after training ('' to skip)."""


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    """Label smoothing (multi-class cross-entropy; for binary, targets move towards 0.5 by half of it)."""
    pos_weight: float = 1.0
    """Binary only: weight of positive samples in BCEWithLogitsLoss (for imbalanced data)."""

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.pos_weight < math.inf:
            problems.append(f"pos_weight: must be > 0 and finite, got {self.pos_weight}")
        return problems


@dataclass
class TrainConfig:
    epochs: int = 10
    """Passes over the training split (ignored with a time_budget)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: run all epochs, or what the time budget allows)."""
    time_budget: str = ""
    """Wall-clock budget of the whole run, e.g. 300s, 45m, 2h ('' = off): the run measures its own speed during the
    learning-rate warmup (schedule.warmup_steps, at least 10), then plans how many optimizer steps fit, leaving time for
    validation and the final test, and sizes its schedule to them. The plan is kept in checkpoints and RUN/plan.json,
    so a resumed run ends where the uninterrupted one would. Replaces epochs."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation, by Accelerate)."""
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    """Autocast precision: bf16 (GPUs since A100; CPUs with AVX512-BF16 or AMX, about 2x fp32 there), fp16 (with a
    gradient scaler), no; 'auto' picks bf16 where the hardware runs it natively, else fp16 on GPUs, else no."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value (0: off)."""
    channels_last: bool = True
    """Keep model and inputs in channels_last memory format (faster convolutions on GPUs)."""
    compile: bool = False
    """torch.compile the model (slower start, faster steps on GPUs)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999), evaluated and
    checkpointed as the model; 0 is off."""
    seed: int = 0
    """Seed of data order, augmentation and initialisation."""
    deterministic: bool = False
    """Use deterministic algorithms only (bitwise-reproducible on CPU; slower on GPUs, where adaptive pooling is
    replaced by an equal deterministic form and CUBLAS_WORKSPACE_CONFIG is set)."""
    sync_batchnorm: bool = False
    """With several GPU ranks, compute BatchNorm statistics over the global batch (SyncBatchNorm) instead of per
    rank; then BatchNorm models train as one process with the global batch would. GPUs only."""
    dist_timeout_s: int = 1800
    """Seconds a rank waits in a collective (a gradient all-reduce, a barrier while rank 0 writes the test's
    plots) before the run fails with an error instead of hanging."""
    cpu: bool = False
    """Run on the CPU even when GPUs are present (test mode). Without GPUs the CPU is used anyway."""
    eval_every_steps: int = 0
    """Validate every N optimizer steps (0: at the end of every epoch)."""
    best_metric: str = "auroc"
    """Validation metric that picks the best checkpoint: accuracy, precision, recall, f1, auroc,
    balanced_accuracy or nll (lower is better)."""
    early_stopping_patience: int = 0
    """Stop after this many validations without improvement of best_metric (0: never)."""

    def validate(self) -> list[str]:
        problems = []
        for name in ("epochs", "grad_accum_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.dist_timeout_s < 1:
            problems.append(f"dist_timeout_s: must be >= 1, got {self.dist_timeout_s}")
        for name in ("max_steps", "eval_every_steps", "early_stopping_patience"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.clip_grad_norm < math.inf:
            problems.append(f"clip_grad_norm: must be >= 0 and finite, got {self.clip_grad_norm}")
        if not 0 <= self.seed < 2**63:  # numpy seed sequences and the loader's uint64 arithmetic need it
            problems.append(f"seed: must be in [0, 2**63), got {self.seed}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.best_metric not in METRIC_NAMES:
            problems.append(f"best_metric: {self.best_metric!r} is not one of {', '.join(METRIC_NAMES)}")
        if self.time_budget:
            try:
                parse_duration(self.time_budget)
            except BudgetError as e:
                problems.append(f"time_budget: {e}")
        return problems


@dataclass
class ExperimentConfig:
    """Everything a training run needs; each section goes only to the component that owns it."""

    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: EvalOptions = field(default_factory=lambda: EvalOptions(threshold="youden"))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> list[str]:
        problems = []
        if self.schedule.name == "plateau" and not self.data.valid_split:
            problems.append("schedule.name: plateau needs validation (data.valid_split)")
        if self.train.time_budget:
            if self.schedule.name in ("onecycle", "plateau"):
                problems.append(
                    f"schedule.name: {self.schedule.name} cannot be planned for a time budget (its learning "
                    "rates from the first step depend on the run's length); use cosine with warmup_steps"
                )
            if self.schedule.warmup_steps < MIN_CALIBRATION_STEPS:
                problems.append(
                    f"schedule.warmup_steps: a time budget measures the run's speed during the warmup; "
                    f"give at least {MIN_CALIBRATION_STEPS}, got {self.schedule.warmup_steps}"
                )
        if self.test.threshold_method and not self.data.valid_split:
            problems.append(
                f"test.threshold: {self.test.threshold} is chosen on the validation split, and "
                "data.valid_split is empty; give a fixed threshold such as 0.5"
            )
        return problems


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Defaults, updated by the YAML file at `path`, updated by dotted `key=value` overrides."""
    return load_config(ExperimentConfig, path, overrides)


RESUMABLE = (
    "tracking.",
    "test.",
    "checkpoint.",
    "train.eval_every_steps",
    "train.dist_timeout_s",
    "train.grad_accum_steps",
    "loader.batch_size",
    "loader.eval_batch_size",
    "loader.num_workers",
    "loader.prefetch_factor",
    "loader.pin_memory",
)
"""Config values a resumed run may change (prefixes of dotted keys): they take effect from the resume on and leave
training as it was (logging, progress bar, W&B, validation and checkpoint cadence, evaluation batch size, the final
test, how many workers read and how). The micro-batch and accumulation may change too (elastic resume): the run
keeps the checkpoint's global batch, and the resume is refused when they cannot make it. Every other value is part
of the run's state: its checkpoints' optimizer, schedule, loader position and weights were made with it, and would
not follow a new value."""


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(old: dict[str, Any], new: ExperimentConfig) -> tuple[list[str], list[str]]:
    """What `new` changes from a run's config `old` (plain data, as a checkpoint or config.yaml holds it), each as
    'key: old -> new': (changes that may apply on resume, changes that may not). A key `old` lacks (written before
    the option existed) counts as its default."""
    before = {**_flat(to_dict(ExperimentConfig())), **_flat(old)}
    allowed, refused = [], []
    for key, value in _flat(to_dict(new)).items():
        if before.get(key) != value:
            (allowed if key.startswith(RESUMABLE) else refused).append(f"{key}: {before.get(key)} -> {value}")
    return allowed, refused
