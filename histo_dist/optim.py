"""Optimizer and learning-rate schedule from their config sections.

Parameter groups: the backbone (see `models.Classifier.backbone_parameters`) trains at
`lr * backbone_lr_scale`, the head at `lr`; and by default biases and normalisation weights get no
weight decay. Frozen parameters (requires_grad False) are left out.

Schedules `constant`, `cosine`, `linear`, `step` and `onecycle` are one `LambdaLR` each, stepped after every
optimizer step; they multiply each group's own lr, so the backbone scale holds throughout, and
stepping past the end keeps the final lr instead of raising. `plateau` is `ReduceLROnPlateau`,
stepped with a validation metric after each evaluation: `scheduler.step(metric)`.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from histo_dist.config import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "step", "onecycle", "plateau")
# onecycle starts at lr / 25, as torch's OneCycleLR and the 1cycle paper (Smith & Topin, 2018).
ONECYCLE_DIV_FACTOR = 25.0


def _unknown(field: str, value: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{field}: unknown {value!r}{hint}; known: {', '.join(known)}"


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer: adam, adamw (decoupled weight decay) or sgd."""
    lr: float = 1e-3
    """Learning rate of the head (the backbone's is scaled by backbone_lr_scale); schedules scale both."""
    weight_decay: float = 0.01
    """Weight decay (L2 for adam and sgd, decoupled for adamw)."""
    momentum: float = 0.9
    """sgd: momentum."""
    nesterov: bool = False
    """sgd: Nesterov momentum (needs momentum > 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """adam, adamw: coefficients of the running averages of the gradient and its square."""
    backbone_lr_scale: float = 1.0
    """Backbone lr = lr * this (e.g. 0.1 to fine-tune gently); 0 leaves the backbone out of the optimizer."""
    decay_norm_and_bias: bool = False
    """Apply weight decay to biases and normalisation weights too (by default they get none)."""

    def validate(self) -> list[str]:
        problems = []
        if self.name not in OPTIMIZERS:
            problems.append(_unknown("name", self.name, OPTIMIZERS))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            problems.append(f"weight_decay: must be >= 0 and finite, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            problems.append(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            problems.append("nesterov: needs name=sgd and momentum > 0")
        if not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas: each must be in [0, 1), got {list(self.betas)}")
        if not 0 <= self.backbone_lr_scale < math.inf:
            problems.append(f"backbone_lr_scale: must be >= 0 and finite, got {self.backbone_lr_scale}")
        return problems


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """LR schedule: constant, cosine, linear (decay to min_lr_ratio in a straight line), step, onecycle (stepped per
    optimizer step) or plateau (per evaluation)."""
    warmup_steps: int = 0
    """constant, cosine, linear, step: optimizer steps of linear warmup from ~0 to lr, before the schedule proper."""
    min_lr_ratio: float = 0.0
    """Lowest lr as a fraction of lr: where cosine, linear and onecycle end, the floor of plateau."""
    step_size: int = 1000
    """step: optimizer steps (after warmup) between two decays."""
    gamma: float = 0.1
    """step: lr factor at each decay."""
    pct_start: float = 0.3
    """onecycle: fraction of the steps spent rising from lr/25 to lr."""
    factor: float = 0.1
    """plateau: lr factor at each reduction."""
    patience: int = 5
    """plateau: evaluations without improvement tolerated before reducing the lr."""
    mode: Literal["min", "max"] = "min"
    """plateau: whether the monitored metric improves by going down (a loss) or up (AUC, accuracy)."""

    def validate(self) -> list[str]:
        problems = []
        if self.name not in SCHEDULES:
            problems.append(_unknown("name", self.name, SCHEDULES))
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        elif self.warmup_steps and self.name in ("onecycle", "plateau"):
            own = " (onecycle warms up over pct_start)" if self.name == "onecycle" else ""
            problems.append(f"warmup_steps: not used by {self.name}; leave it 0{own}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.step_size < 1:
            problems.append(f"step_size: must be >= 1, got {self.step_size}")
        if not 0 < self.gamma <= 1:
            problems.append(f"gamma: must be in (0, 1], got {self.gamma}")
        if not 0 < self.pct_start < 1:
            problems.append(f"pct_start: must be in (0, 1), got {self.pct_start}")
        if not 0 < self.factor < 1:
            problems.append(f"factor: must be in (0, 1), got {self.factor}")
        if self.patience < 0:
            problems.append(f"patience: must be >= 0, got {self.patience}")
        return problems


# ---------------------------------------------------------------------------------------------
# Optimizer


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters in up to four groups, {backbone, head} x {decay, no_decay}, each with its lr.

    The head is `model.head_parameters()` when the model has it (models.Classifier); otherwise
    every parameter counts as head and trains at the full lr.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # the wrapper hides head_parameters; its parameters are the model's
    head_ids = {id(p) for p in model.head_parameters()} if hasattr(model, "head_parameters") else None
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {
        (part, decay): [] for part in ("backbone", "head") for decay in (True, False)
    }
    for p in model.parameters():
        part = "head" if head_ids is None or id(p) in head_ids else "backbone"
        if not p.requires_grad or (part == "backbone" and cfg.backbone_lr_scale == 0):
            continue
        # ndim <= 1 is every bias and every normalisation weight (BatchNorm, LayerNorm, GroupNorm
        # scales are 1-D), without a list of norm layer types.
        groups[(part, cfg.decay_norm_and_bias or p.ndim > 1)].append(p)
    return [
        {
            "name": f"{part}/{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": cfg.lr * (cfg.backbone_lr_scale if part == "backbone" else 1.0),
            "weight_decay": cfg.weight_decay if decay else 0.0,
        }
        for (part, decay), params in groups.items()
        if params
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The configured optimizer over `param_groups(model, cfg)`; build it before `accelerator.prepare`.

    backbone_lr_scale 0 freezes the backbone (requires_grad False, its BatchNorms in eval mode), as
    `model.freeze=all` does: left out of the optimizer but still taking gradients, it would pile them up
    (zero_grad clears only the optimizer's), all-reduce them and count them in gradient clipping."""
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "optim config")
    if cfg.backbone_lr_scale == 0 and hasattr(model, "backbone_parameters"):
        for p in model.backbone_parameters():
            p.requires_grad_(False)
        model.train(model.training)  # (Classifier.train puts frozen BatchNorms in eval mode)
    groups = param_groups(model, cfg)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=cfg.lr, betas=cfg.betas)


# ---------------------------------------------------------------------------------------------
# Schedule


def lr_factor(cfg: ScheduleConfig, total_steps: int, step: int, warmup_end: int | None = None) -> float:
    """Multiplier of the configured lr after `step` optimizer steps (constant, cosine, linear, step, onecycle).

    `warmup_end`, when it comes before `cfg.warmup_steps`, cuts the warmup there: a time budget too short for the
    whole warmup (budget.py). The ramp up to it is the configured one, and the schedule proper then starts from
    the ramp's next value instead of the full lr (a cosine decays from it), so no step before the cut changes."""
    warmup = cfg.warmup_steps
    end = warmup if warmup_end is None else min(warmup, warmup_end)
    if step < end:
        return (step + 1) / (warmup + 1)
    peak = min(1.0, (end + 1) / (warmup + 1))  # 1.0 after a whole warmup
    if cfg.name == "constant":
        return peak
    if cfg.name == "step":
        return peak * cfg.gamma ** ((step - end) // cfg.step_size)
    if cfg.name in ("cosine", "linear"):
        # (max: a time budget can end a run at the end of its warmup)
        low, progress = min(peak, cfg.min_lr_ratio), min(1.0, (step - end) / max(1, total_steps - end))
        return _cosine(peak, low, progress) if cfg.name == "cosine" else peak + (low - peak) * progress
    if cfg.name == "onecycle":
        rise = max(1, round(cfg.pct_start * total_steps))
        if step < rise:
            return _cosine(1 / ONECYCLE_DIV_FACTOR, 1.0, step / rise)
        return _cosine(1.0, cfg.min_lr_ratio, (step - rise) / max(1, total_steps - rise))
    raise ValueError(f"no lr factor for schedule {cfg.name!r}")


def _cosine(start: float, end: float, progress: float) -> float:
    """Half a cosine from `start` (progress 0) to `end` (progress >= 1)."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> LRScheduler | ReduceLROnPlateau:
    """The configured schedule over `optimizer`'s groups (call after the optimizer is built).

    `total_steps` counts optimizer steps of ONE process over the whole run, i.e. after gradient
    accumulation (batches / accumulation steps), whatever the number of processes. Step the result
    yourself after each real optimizer step (`accelerator.sync_gradients`; plateau: after each
    evaluation, with the metric); do not hand it to `accelerator.prepare`, which would step it once
    per process per optimizer step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    problems = cfg.validate()
    if not problems and cfg.warmup_steps >= total_steps:
        problems.append(f"warmup_steps: {cfg.warmup_steps} must be less than the run's {total_steps} optimizer steps")
    if problems:
        raise ConfigError(problems, "schedule config")
    if cfg.name == "plateau":
        min_lrs = [group["lr"] * cfg.min_lr_ratio for group in optimizer.param_groups]
        return ReduceLROnPlateau(optimizer, mode=cfg.mode, factor=cfg.factor, patience=cfg.patience, min_lr=min_lrs)
    return LambdaLR(optimizer, functools.partial(lr_factor, cfg, total_steps))


class LRSchedule:
    """The schedule as the trainer drives it: stepped after every optimizer step, or, for plateau,
    after every validation with the monitored metric. Its state is the scheduler's."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
        self.cfg = cfg
        self.scheduler = build_scheduler(optimizer, cfg, total_steps)
        self.per_validation = cfg.name == "plateau"

    def set_total_steps(self, total_steps: int, warmup_end: int | None = None) -> None:
        """The run's length, once a time budget's plan knows it, and where its warmup ends if the plan cut it
        (`lr_factor`). The factors of the steps taken so far (the warmup) do not depend on either."""
        if isinstance(self.scheduler, LambdaLR):
            self.scheduler.lr_lambdas = [
                functools.partial(lr_factor, self.cfg, total_steps, warmup_end=warmup_end)
                for _ in self.scheduler.lr_lambdas
            ]

    def after_optimizer_step(self) -> None:
        if not self.per_validation:
            self.scheduler.step()

    def after_validation(self, metric: float) -> None:
        if self.per_validation:
            self.scheduler.step(metric)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)
