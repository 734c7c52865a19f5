"""Train a patch classifier on converted shards, in one process or under `accelerate launch`.

    histo-dist train --config configs/cpu_test.yaml [--run-dir DIR] [key=value ...]
    accelerate launch --multi_gpu --num_processes 2 -m histo_dist train --config ... (2 ranks)

The run, top to bottom: load and check the config (before any data is read), make the run
directory, build the Accelerator (DDP, mixed precision, gradient accumulation), per-rank loaders
(not passed through `accelerator.prepare`: each rank reads its own part), model, optimizer and
schedule, resume from the newest valid checkpoint, then the loop: train steps, periodic
validation, atomic checkpoints, logging; finally the best checkpoint is evaluated on the test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from histo_dist.augment import AugmentConfig, augment, normalize_only
from histo_dist.checkpoint import CheckpointConfig, Checkpointer, load_checkpoint
from histo_dist.config import ConfigError, dump_yaml, load_config, to_dict
from histo_dist.errors import HistoDistError
from histo_dist.loader import LoaderConfig, ShardLoader
from histo_dist.manifest import Manifest
from histo_dist.metrics import METRIC_NAMES, EvalMetrics, is_better
from histo_dist.models import ModelConfig, build_model
from histo_dist.optim import OptimConfig, ScheduleConfig, build_optimizer, build_scheduler
from histo_dist.tracking import RunLog, TrackingConfig, setup_logging

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Configuration: each component owns its section; the trainer assembles them.


@dataclass
class DataConfig:
    shards: str = "shards/pcam"
    """Folder with manifest.json and the shards (written by `histo-dist convert`)."""
    train_split: str = "train"
    """Split to train on."""
    valid_split: str = "valid"
    """Split for validation during training and for choosing the best checkpoint."""
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
    """Passes over the training split."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: run all epochs)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (gradient accumulation, by Accelerate)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision (bf16 on H100/H200/A100; fp16 uses a gradient scaler)."""
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
    """Use deterministic algorithms only (bitwise-reproducible on CPU; slower on GPUs)."""
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
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> list[str]:
        problems = []
        if self.schedule.name == "plateau" and self.train.best_metric and not self.data.valid_split:
            problems.append("schedule.name: plateau needs validation (data.valid_split)")
        return problems


def load_experiment(path: str | Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, overrides)


# ---------------------------------------------------------------------------------------------
# The trainer


class NonFiniteLossError(HistoDistError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again"; slurm/*.sbatch requeue the job on this code
PREEMPT_SIGNALS = ("SIGUSR1", "SIGTERM")


class Preempted(Exception):
    """A preemption signal arrived; a checkpoint was written and the run should be requeued."""


class PreemptionFlag:
    """Remembers that SIGUSR1/SIGTERM arrived. The handler only sets a flag (safe to run twice,
    and SLURM may deliver the signal to every process of a step); the training loop acts on it."""

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> None:
        import signal

        for name in PREEMPT_SIGNALS:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        self.signal = self.signal or signal.Signals(signum).name

    def ignore(self) -> None:
        """Ignore further preemption signals, once the checkpoint is written and the process is on its
        way out with 75. Python restores the default handlers while it shuts down; a late signal then
        (torchrun stopping the ranks that have not exited yet, SLURM signalling again) would kill the
        process, which would report -15 instead of the 75 a requeue needs."""
        import signal

        for name in PREEMPT_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _step_seed(seed: int, rank: int, step: int) -> int:
    """Seed for the torch RNG at a given step (dropout, etc.): a resumed run draws the same numbers
    on every rank without saving RNG states."""
    return (seed * 1_000_003 + rank * 7919 + step * 104_729) % (2**63)


class Trainer:
    """A small orchestrator: owns the model, optimizer, schedule, loaders and their state."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin

        self.cfg, self.run_dir = cfg, run_dir
        t = cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.accelerator = accelerator or Accelerator(
            cpu=t.cpu or not torch.cuda.is_available(),
            mixed_precision=t.mixed_precision,
            # Our loaders are not `prepare`d, so accumulation syncs every k micro-batches, never on a
            # dataloader end it cannot see; epochs are cut to multiples of k below.
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.grad_accum_steps, sync_with_dataloader=False),
            log_with="wandb" if cfg.tracking.wandb and cfg.tracking.mode != "disabled" else None,
        )
        acc = self.accelerator
        self.rank, self.world_size, self.device = acc.process_index, acc.num_processes, acc.device
        torch.manual_seed(t.seed)  # identical initial weights on every rank

        # Data: one loader per rank and split, straight from the shards.
        self.manifest = Manifest.load(cfg.data.shards)
        self.num_classes = self.manifest.num_classes
        worker_aug = cfg.augment.enabled and cfg.augment.where == "worker"
        self.train_loader = ShardLoader(
            self.manifest, cfg.data.train_split, cfg.loader, rank=self.rank, world_size=self.world_size,
            seed=t.seed, training=True, transform=_WorkerAugment(cfg.augment) if worker_aug else None,
        )
        self.micro_per_epoch = len(self.train_loader) // t.grad_accum_steps * t.grad_accum_steps
        self.steps_per_epoch = self.micro_per_epoch // t.grad_accum_steps
        if self.steps_per_epoch == 0:
            raise HistoDistError(
                f"{len(self.train_loader)} batches per epoch on each rank is fewer than train.grad_accum_steps="
                f"{t.grad_accum_steps}; lower loader.batch_size or grad_accum_steps"
            )
        self.total_steps = self.steps_per_epoch * t.epochs
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

        # Model, optimizer, schedule. The scheduler is NOT passed through `prepare`: Accelerate
        # would step it once per process per optimizer step (anchors note, item 8).
        model = build_model(cfg.model, self.num_classes)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(optimizer, cfg.schedule, self.total_steps)
        if t.compile:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.ema = None
        if t.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(acc.unwrap_model(self.model), multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay),
                                     use_buffers=True)
        if self.num_classes == 2:
            self.loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(cfg.loss.pos_weight, device=self.device))
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)

        self.checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
        self.step = 0  # optimizer steps done
        self.best: float | None = None
        self.evals_without_improvement = 0
        self.skipped_samples = 0  # corrupt training samples skipped over the run, all ranks (loader.skip_corrupt)
        self._pending_losses: list[tuple[int, torch.Tensor]] = []
        self.preemption = PreemptionFlag()

    # -- one micro-batch ---------------------------------------------------------------------------
    def prepare_inputs(self, batch: dict[str, Any], training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a loader batch to the device and finish augmentation/normalisation there."""
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:  # not yet augmented in a worker
            if training and self.cfg.augment.enabled:
                images = augment(images, batch["seed"].to(self.device, non_blocking=True), self.cfg.augment)
            else:
                images = normalize_only(images, self.cfg.augment)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 2:
            target = labels.float()
            if self.cfg.loss.label_smoothing:
                target = target * (1 - self.cfg.loss.label_smoothing) + 0.5 * self.cfg.loss.label_smoothing
            return self.loss_fn(logits.reshape(-1).float(), target)
        return self.loss_fn(logits.float(), labels)

    def train_step(self, batch: dict[str, Any]) -> bool:
        """Forward and backward on one micro-batch; steps the optimizer every k-th. True if it did."""
        acc = self.accelerator
        torch.manual_seed(_step_seed(self.cfg.train.seed, self.rank, self.step))
        images, labels = self.prepare_inputs(batch, training=True)
        self.model.train()
        with acc.accumulate(self.model):
            logits = self.model(images)
            # A batch whose samples were all skipped as corrupt (loader.skip_corrupt) still takes its
            # step with a zero loss: every rank must join the gradient all-reduce.
            loss = self.loss(logits, labels) if len(labels) else logits.sum() * 0.0
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.train.clip_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad_norm)
            self.optimizer.step()  # a no-op between accumulation boundaries
            self.optimizer.zero_grad(set_to_none=True)
        # Kept on the device: checking them here would be a CPU-GPU sync point every step.
        with torch.no_grad():
            predicted = (logits.reshape(-1) > 0).long() if self.num_classes == 2 else logits.argmax(1)
            accuracy = (predicted == labels).float().mean() if len(labels) else torch.zeros((), device=self.device)
            skipped = loss.new_tensor(float(batch.get("skipped", 0)), dtype=torch.float32)
        self._pending_losses.append((self.step + 1, torch.stack([loss.detach().float(), accuracy, skipped])))
        if not acc.sync_gradients:
            return False
        if self.cfg.schedule.name != "plateau":
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(acc.unwrap_model(self.model))
        self.step += 1
        return True

    def flush_losses(self) -> tuple[float, float]:
        """Mean training loss and accuracy since the last flush over all ranks; raises if a loss
        was NaN/inf; adds the samples skipped as corrupt to `skipped_samples`. This is the loop's sync
        point (once per log interval, not per step)."""
        if not self._pending_losses:
            return float("nan"), float("nan")
        steps = [s for s, _ in self._pending_losses]
        values = self.accelerator.reduce(torch.stack([v for _, v in self._pending_losses]), "mean").cpu()
        self._pending_losses.clear()
        losses, accuracies = values[:, 0], values[:, 1]
        self.skipped_samples += round(float(values[:, 2].sum()) * self.world_size)  # mean over ranks -> sum
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            step = steps[int(bad[0])]
            last = self.checkpointer.newest_valid()
            raise NonFiniteLossError(
                f"loss is {losses[int(bad[0])].item()} at optimizer step {step}: stopping. "
                f"Last good checkpoint: {last or 'none yet'} (lower optim.lr, enable train.clip_grad_norm, "
                "or check the data)"
            )
        return float(losses.mean()), float(accuracies.mean())

    # -- evaluation --------------------------------------------------------------------------------
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def evaluate(self, split: str, predictions: bool = False) -> dict[str, Any]:
        """Metrics over the whole split, every sample exactly once across ranks (every rank calls this)."""
        loader = ShardLoader(self.manifest, split, self.cfg.loader, rank=self.rank, world_size=self.world_size,
                             seed=self.cfg.train.seed, training=False)
        metrics = EvalMetrics(self.num_classes, self.device)
        model = self.eval_model()
        model.eval()
        probs, labels_all, skipped = [], [], 0
        for batch in loader:
            skipped += batch["skipped"]
            if not len(batch["label"]):
                continue
            images, labels = self.prepare_inputs(batch, training=False)
            with self.accelerator.autocast():
                logits = model(images)
            metrics.update(logits, labels)
            if predictions:
                p = torch.sigmoid(logits.float().reshape(-1)) if self.num_classes == 2 else torch.softmax(logits.float(), 1)
                probs.append(p.cpu())
                labels_all.append(labels.cpu())
        values = metrics.compute()  # collective
        expected = self.manifest.split(split).num_samples
        if self.cfg.loader.skip_corrupt:  # samples skipped as corrupt were read, just not counted
            skipped = int(self.accelerator.reduce(torch.tensor([skipped], device=self.device), "sum").item())
            values["skipped_samples"] = skipped
            if skipped:
                log.warning("evaluation of %r: %d corrupt sample(s) skipped (loader.skip_corrupt)", split, skipped)
        if int(values["num_samples"]) + skipped != expected:
            raise HistoDistError(
                f"evaluation of {split!r} counted {int(values['num_samples'])} samples across ranks"
                + (f" and skipped {skipped}" if skipped else "") + f", the manifest has {expected}"
            )
        if predictions:
            values["_predictions"] = _gather_to_main(torch.cat(probs), torch.cat(labels_all))
        return values

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        acc = self.accelerator
        state = {
            "format": "histo-dist-checkpoint-1",
            "step": self.step,
            "model": acc.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "loader": self.train_loader.state_dict(),
            "best": self.best,
            "evals_without_improvement": self.evals_without_improvement,
            "skipped_samples": self.skipped_samples,
            "config": to_dict(self.cfg),
            "num_classes": self.num_classes,
            "label_names": list(self.manifest.label_names),
            "image_shape": list(self.manifest.image_shape),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if acc.scaler is not None:
            state["scaler"] = acc.scaler.state_dict()
        return state

    def save_checkpoint(self, is_best: bool = False) -> None:
        self.flush_losses()  # never checkpoint weights that came from a NaN step
        if self.accelerator.is_main_process:
            path = self.checkpointer.save(self.step, self.state_dict(), is_best=is_best)
            log.info("checkpoint %s%s", path, " (best)" if is_best else "")
        self.accelerator.wait_for_everyone()

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)  # to CPU; load_state_dict copies onto the device
        acc = self.accelerator
        acc.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        loader_state = dict(state["loader"], rank=self.rank)  # rank 0 saved it; positions are shared
        self.train_loader.load_state_dict(loader_state)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if acc.scaler is not None and "scaler" in state:
            acc.scaler.load_state_dict(state["scaler"])
        self.step, self.best = int(state["step"]), state["best"]
        self.evals_without_improvement = int(state["evals_without_improvement"])
        self.skipped_samples = int(state.get("skipped_samples", 0))
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, loader_state["epoch"], loader_state["batch"])

    def preempted(self) -> bool:
        """True on every rank when any rank got a preemption signal. With several ranks this is a
        tiny all-reduce (a sync point) once per optimizer step, so all ranks stop at the same step."""
        flag = self.preemption.signal is not None
        if self.world_size == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "max").item())

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, run_log: RunLog) -> dict[str, Any]:
        from tqdm import tqdm

        t, acc = self.cfg.train, self.accelerator
        resume = self.checkpointer.resume_path()
        if resume is not None:
            self.load(resume)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (acc.is_main_process and self.cfg.tracking.progress), dynamic_ncols=True)
        global_batch = self.cfg.loader.batch_size * t.grad_accum_steps * self.world_size
        tick, tick_step = time.perf_counter(), self.step
        patience = t.early_stopping_patience
        # (A run preempted right after early stopping said stop resumes into the test evaluation.)
        stop = self.step >= self.total_steps or bool(patience and self.evals_without_improvement >= patience)
        while not stop:
            epoch = self.train_loader.epoch
            for batch in self.train_loader:
                if self.train_loader.batch > self.micro_per_epoch:  # epoch cut to whole optimizer steps
                    break
                if not self.train_step(batch):
                    continue
                if self.step % self.cfg.tracking.log_every_steps == 0:
                    loss, accuracy = self.flush_losses()
                    now = time.perf_counter()
                    images_per_s = (self.step - tick_step) * global_batch / (now - tick)
                    tick, tick_step = now, self.step
                    lr = self.optimizer.param_groups[-1]["lr"]
                    record = {"loss": loss, "accuracy": accuracy, "lr": lr, "images_per_s": images_per_s, "epoch": epoch}
                    if self.cfg.loader.skip_corrupt:
                        record["skipped_samples"] = self.skipped_samples
                    run_log.log(record, self.step, "train")
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")
                bar.update(1)
                end_of_epoch = self.train_loader.batch >= self.micro_per_epoch
                if end_of_epoch:
                    self.train_loader.set_epoch(epoch + 1)  # the saved position is the next epoch's start
                stop, saved = self.step >= self.total_steps, True
                if (t.eval_every_steps and self.step % t.eval_every_steps == 0) or (not t.eval_every_steps and end_of_epoch) or stop:
                    if self.validate(run_log, epoch):  # (it checkpoints)
                        stop = True
                elif (self.cfg.checkpoint.every_steps and self.step % self.cfg.checkpoint.every_steps == 0) or end_of_epoch:
                    self.save_checkpoint()
                else:
                    saved = False
                # Only after this step's validation: a run preempted between a step and its validation
                # would resume past that validation, and could pick another best checkpoint.
                if self.preempted():
                    if not saved:
                        self.save_checkpoint()
                    self.preemption.ignore()
                    log.warning("preempted (%s): checkpoint at step %d written; exiting with code %d for requeue",
                                self.preemption.signal or "signal on another rank", self.step, EXIT_PREEMPTED)
                    raise Preempted()
                if stop or end_of_epoch:
                    break
        bar.close()
        return self.test(run_log)

    def validate(self, run_log: RunLog, epoch: int) -> bool:
        """Validate, checkpoint (marking the best), and return True when early stopping says stop."""
        split = self.cfg.data.valid_split
        if not split:
            self.save_checkpoint()
            return False
        self.flush_losses()
        values = self.evaluate(split)
        metric = self.cfg.train.best_metric
        improved = is_better(metric, values[metric], self.best)
        if improved:
            self.best, self.evals_without_improvement = values[metric], 0
        else:
            self.evals_without_improvement += 1
        if self.cfg.schedule.name == "plateau":
            self.scheduler.step(values[metric])
        run_log.log({**values, "epoch": epoch, f"best_{metric}": self.best}, self.step, "valid")
        log.info("step %d valid %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in values.items()))
        self.save_checkpoint(is_best=improved)
        patience = self.cfg.train.early_stopping_patience
        if patience and self.evals_without_improvement >= patience:
            log.info("early stopping: %s has not improved for %d validations", metric, patience)
            return True
        return False

    def test(self, run_log: RunLog) -> dict[str, Any]:
        """Evaluate the best checkpoint (or the final weights without validation) on the test split."""
        split = self.cfg.data.test_split
        if not split:
            return {}
        best = self.checkpointer.folder / "best.pt"
        if best.exists():
            state = load_checkpoint(best)
            target = self.ema if self.ema is not None else self.accelerator.unwrap_model(self.model)
            target.load_state_dict(state["ema"] if self.ema is not None else state["model"])
        values = self.evaluate(split, predictions=True)
        predictions = values.pop("_predictions")
        if self.cfg.loader.skip_corrupt:
            values["train_skipped_samples"] = self.skipped_samples
        run_log.log(values, self.step, "test")
        run_log.summary({f"test/{k}": v for k, v in values.items()})
        if self.accelerator.is_main_process:
            (self.run_dir / "test_metrics.json").write_text(json.dumps(values, indent=2) + "\n")
            from histo_dist.plots import save_test_plots

            images = save_test_plots(predictions[0], predictions[1], self.manifest.label_names, self.run_dir / "plots", values)
            run_log.log_images(images, self.step)
        return values


class _WorkerAugment:
    """Picklable transform for loader workers: augmentation on the CPU, per sample."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return augment(images, seeds, self.cfg)


def _gather_to_main(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' predictions on every rank (variable sizes per rank, so gather objects, not tensors)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return probs, labels
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (probs, labels))
    return torch.cat([p for p, _ in parts]), torch.cat([l for _, l in parts])


# ---------------------------------------------------------------------------------------------
# Run directory and provenance


def provenance(accelerator, manifest: Manifest) -> dict[str, Any]:
    """Code, versions, hardware and data identity of a run."""
    import hashlib
    import importlib.metadata
    import platform
    import socket
    import subprocess
    import sys

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
            return out.stdout.strip() if out.returncode == 0 else None
        except OSError:
            return None

    packages = {}
    for name in ("histo-dist", "torch", "torchvision", "accelerate", "webdataset", "torchmetrics", "wandb", "numpy", "h5py"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    status = git("status", "--porcelain")
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if accelerator.device.type == "cuda" else [platform.processor() or platform.machine()])
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "command": sys.argv,
        "python": sys.version.split()[0],
        "packages": packages,
        "host": socket.gethostname(),
        "world_size": accelerator.num_processes,
        "device_type": accelerator.device.type,
        "devices": devices,
        "mixed_precision": accelerator.mixed_precision,
        "manifest": str(manifest.root / "manifest.json"),
        "manifest_sha256": hashlib.sha256((manifest.root / "manifest.json").read_bytes()).hexdigest(),
    }


def default_run_dir(config_path: str | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: ExperimentConfig, run_dir: Path | None, config_path: str | None = None) -> dict[str, Any]:
    from accelerate.utils import broadcast_object_list

    trainer = Trainer(cfg, Path("."))  # run_dir is settled below, once ranks agree on it
    acc = trainer.accelerator
    setup_logging(acc.process_index, acc.num_processes)
    chosen = [str(run_dir or default_run_dir(config_path))]
    broadcast_object_list(chosen)  # the main process's timestamp names the run on every rank
    run_dir = Path(chosen[0])
    trainer.run_dir = run_dir
    trainer.checkpointer.folder = run_dir / "checkpoints"
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
        (run_dir / "provenance.json").write_text(json.dumps(provenance(acc, trainer.manifest), indent=2) + "\n")
    acc.wait_for_everyone()
    run_log = RunLog(acc, run_dir, cfg.tracking, to_dict(cfg))
    trainer.preemption.install()
    try:
        results = trainer.fit(run_log)
        if acc.is_main_process:
            log.info("run finished: %s", run_dir)
            if cfg.loader.skip_corrupt:
                log.warning("corrupt samples skipped (loader.skip_corrupt): %d in training%s; the warnings above name them",
                            trainer.skipped_samples, f", {results['skipped_samples']} in the test split" if results else "")
            if results:
                log.info("test: %s", " ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))
        return results
    finally:
        _end_training(acc)


def _end_training(acc) -> None:
    """Close W&B and destroy the process group (without it the processes abort at exit), even when
    the W&B service is already gone."""
    try:
        acc.end_training()
    except Exception as e:  # noqa: BLE001 - a dead tracker must not leave the process group behind
        log.warning("closing the trackers failed (%s: %s)", type(e).__name__, e)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Command line


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML experiment config (see configs/); defaults are used for what it omits")
    parser.add_argument("--run-dir", help="run directory (default: runs/<config name>-<time>); reuse it to resume")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of config values, e.g. optim.lr=0.01 loader.batch_size=64")


def run(args: argparse.Namespace) -> int:
    cfg = load_experiment(args.config, args.overrides)  # every config mistake surfaces here, before any data
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    Manifest.load(cfg.data.shards)  # a missing dataset is named before processes spin up
    try:
        train(cfg, Path(args.run_dir) if args.run_dir else None, args.config)
    except Preempted:
        return EXIT_PREEMPTED
    return 0
