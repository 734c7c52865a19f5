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

A timm model says what input it takes (`models.input_defaults`): its side and normalisation become
augment.resize, mean and std, and augmentation moves to the device (augment.where), wherever the
config gives no value of its own (`with_model_input`); the resolved values are what the run records.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from histo_dist.augment import AugmentConfig
from histo_dist.budget import MIN_CALIBRATION_STEPS, BudgetError, parse_duration
from histo_dist.checkpoint import CheckpointConfig
from histo_dist.config import from_dict, read_config_data, to_dict
from histo_dist.evaluation import EvalOptions
from histo_dist.loader import LoaderConfig
from histo_dist.metrics import METRIC_NAMES
from histo_dist.models import ModelConfig, input_defaults
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
    seeds: tuple[int, ...] = ()
    """Train once per seed (each as train.seed, in RUN/seed-<seed>/) and report the mean and spread of the test
    metrics over them in RUN/seeds.json, as eva does (5 runs); empty: one run with train.seed."""
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
    cpu_threads: int = 0
    """Threads of torch's CPU operations in each training process (0: torch's default, one per core). Heads on
    embeddings train fastest with 1: their steps are too small to share out, and threads waiting on each other
    cost more than they save (20x more on a busy 2-core machine, docs/benchmarks.md)."""
    cpu_keep_freed_memory: bool = True
    """CPU runs on glibc (Linux): malloc keeps the memory PyTorch frees for the next step instead of handing it
    back to the kernel. A step frees and reallocates multi-MB activations, and every page taken back from the
    kernel costs a page fault: keeping them made training on 2 cores about 1.4x faster (docs/benchmarks.md).
    The process's memory then stays near its peak until it exits. Elsewhere (GPUs, other C libraries) no effect."""
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
        for name in ("max_steps", "eval_every_steps", "early_stopping_patience", "cpu_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.clip_grad_norm < math.inf:
            problems.append(f"clip_grad_norm: must be >= 0 and finite, got {self.clip_grad_norm}")
        if not 0 <= self.seed < 2**63:  # numpy seed sequences and the loader's uint64 arithmetic need it
            problems.append(f"seed: must be in [0, 2**63), got {self.seed}")
        if not all(0 <= s < 2**63 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds: distinct seeds in [0, 2**63), got {list(self.seeds)}")
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
                    "rates from the first step depend on the run's length); use cosine or linear with warmup_steps"
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


def with_model_input(augment: AugmentConfig, model: ModelConfig, given: Mapping[str, Any] | None) -> AugmentConfig:
    """`augment` with what the model says about its input (a timm model: side and normalisation of its pretrained
    config, and augmentation on the device, where the upscaled float batch is made) for every value not `given`."""
    defaults = input_defaults(model)
    if defaults:
        # 96 -> 224 px is 5.4x the pixels, as float32: made by loader workers, that is 22x the bytes of the patch
        # crossing to the training process; made on the device, only the uint8 patch crosses.
        defaults["where"] = "device"
    return dataclasses.replace(augment, **{k: v for k, v in defaults.items() if k not in (given or {})})


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    """Defaults, updated by the YAML file at `path`, updated by dotted `key=value` overrides; a timm model's input
    values where the augment section gives none (`with_model_input`)."""
    data, source = read_config_data(path, overrides)
    cfg = from_dict(ExperimentConfig, data, source)
    cfg.augment = with_model_input(cfg.augment, cfg.model, data.get("augment"))
    return cfg


RESUMABLE = (
    "tracking.",
    "test.",
    "checkpoint.",
    "train.eval_every_steps",
    "train.dist_timeout_s",
    "train.cpu_keep_freed_memory",
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
