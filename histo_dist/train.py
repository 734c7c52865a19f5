"""Train a patch classifier on converted shards, in one process or under `accelerate launch`.

    histo-dist train --config configs/cpu_test.yaml [--run-dir DIR] [key=value ...]
    histo-dist train --help-config [SECTION]      (every config value, its default and what it does)
    accelerate launch --multi_gpu --num_processes 2 -m histo_dist train --config ... (2 ranks)

The run, top to bottom: load and check the config (before any data is read), build the
Accelerator (DDP, mixed precision, gradient accumulation), take the run directory (rank 0 locks it
and decides what the start continues: `choose_resume`), per-rank loaders (not passed through
`accelerator.prepare`: each rank reads its own part), model, optimizer and schedule, resume from
the checkpoint (its config compared with this one), write config.yaml and provenance.json (only
now: a refused start writes nothing), then the loop: train steps, validation when the `Validator` says so,
checkpoints when the `Checkpointer` says so, logging; finally the best checkpoint is evaluated on
the test split exactly as `histo-dist evaluate` would (evaluation.py), into RUN/test/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from histo_dist import budget
from histo_dist.allocator import keep_freed_memory
from histo_dist.augment import AugmentConfig, augment, eval_transform
from histo_dist.budget import Plan, make_plan, parse_duration, replan_step
from histo_dist.checkpoint import Checkpointer, model_weights, read_training_checkpoint
from histo_dist.config import to_dict
from histo_dist.ema import EMA, broadcast_buffers
from histo_dist.errors import HistoDistError
from histo_dist.evaluation import evaluate_split, gather_objects, scalars, validate_split, write_evaluation
from histo_dist.experiment import RESUMABLE, ExperimentConfig, load_experiment, resume_changes
from histo_dist.files import check_input, write_atomic
from histo_dist.inference import InferenceModel
from histo_dist.loader import first_images, split_loader
from histo_dist.manifest import Manifest
from histo_dist.metrics import is_better
from histo_dist.models import build_model, check_input_side, make_deterministic, whiten_stem_
from histo_dist.optim import LRSchedule, build_optimizer
from histo_dist.preemption import EXIT_PREEMPTED, Preempted, PreemptionFlag
from histo_dist.rundir import RunDirClaim, RunDirError, default_run_dir, earlier_run, provenance, write_run_files
from histo_dist.tracking import RunLog, keep_records_until, setup_logging

log = logging.getLogger(__name__)
UNPLANNED = sys.maxsize  # the length of a budgeted run before its plan
WHITEN_IMAGES = 1024  # model.stem_init=whiten: images read for the patch statistics (~0.9 M 3x3 patches at 32 px)


class NonFiniteLossError(HistoDistError):
    """The loss became NaN or inf; the run stops and keeps its last good checkpoint."""


def _step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """Seed for the torch RNG of a micro-batch (dropout, etc.): a resumed run draws the same numbers on
    every rank without saving RNG states, and the micro-batches of an accumulated step draw different ones."""
    return (seed * 1_000_003 + rank * 7919 + step * 104_729 + micro * 15_485_863) % (2**63)


def _seed_step(seed: int, device: torch.device) -> None:
    """Seed the generators a step draws from: the CPU's, and the GPU's it runs on. (torch.manual_seed also queues
    a seed for CUDA when CUDA is not initialised, with a traceback: ~3 ms per call, longer than a probe's step.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions run about twice as fast as fp32 (elsewhere they are emulated)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(torch.cpu, probe)():
                return True
        except (AttributeError, RuntimeError):  # private probes: absent in some torch releases
            pass
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx512_bf16" in flags or " amx_bf16" in flags
    except OSError:
        return False


def resolve_precision(requested: str, cpu: bool) -> str:
    """train.mixed_precision as Accelerate takes it: 'auto' becomes what this hardware runs fast."""
    if requested != "auto":
        return requested
    if cpu:
        chosen, why = (
            ("bf16", "this CPU has AVX512-BF16/AMX") if cpu_has_native_bf16() else ("no", "no native bf16 here")
        )
    elif torch.cuda.is_bf16_supported():
        chosen, why = "bf16", torch.cuda.get_device_name()
    else:
        chosen, why = "fp16", f"{torch.cuda.get_device_name()} has no bf16"
    log.info("train.mixed_precision=auto: %s (%s)", chosen, why)
    return chosen


class Validator:
    """When to validate, the best value of the chosen metric so far, and when to stop early."""

    def __init__(self, split: str, every_steps: int, metric: str, patience: int):
        self.split, self.every_steps, self.metric, self.patience = split, every_steps, metric, patience
        self.best: float | None = None
        self.evals_without_improvement = 0

    def due(self, step: int, *, end_of_epoch: bool, last_step: bool) -> bool:
        """Every `every_steps` optimizer steps (else at the end of every epoch), and after the last step."""
        if not self.split:
            return False
        return last_step or (step % self.every_steps == 0 if self.every_steps else end_of_epoch)

    def record(self, values: dict[str, Any]) -> bool:
        """Take a validation's metrics; True when it is the best so far."""
        improved = is_better(self.metric, values[self.metric], self.best)
        if improved:
            self.best, self.evals_without_improvement = values[self.metric], 0
        else:
            self.evals_without_improvement += 1
        return improved

    @property
    def stop_early(self) -> bool:
        return bool(self.patience and self.evals_without_improvement >= self.patience)


class Trainer:
    """A small orchestrator: owns the model, optimizer, schedule and loaders, and asks the Validator
    and the Checkpointer when to act."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, accelerator=None):
        self.cfg, self.run_dir = cfg, run_dir
        t = cfg.train
        self.accelerator = accelerator or build_accelerator(cfg)
        acc = self.accelerator
        self.rank, self.world_size, self.device = acc.process_index, acc.num_processes, acc.device
        torch.manual_seed(t.seed)  # identical initial weights on every rank

        # Data: one loader per rank and split, straight from the shards.
        self.manifest = Manifest.load(cfg.data.shards)
        self.num_classes = self.manifest.num_classes
        embeddings = self.manifest.embeddings  # (N, D) vectors: no crop, resize, augmentation or TTA
        if embeddings and cfg.test.tta:
            raise HistoDistError(
                f"test.tta: TTA averages over the symmetries of images, and {cfg.data.shards} holds embeddings; "
                "set test.tta=false"
            )
        if not embeddings:
            height, width = self.manifest.image_shape[:2]
            if cfg.augment.crop > min(height, width):
                raise HistoDistError(
                    f"augment.crop={cfg.augment.crop} does not fit the {width}x{height} patches of "
                    f"{cfg.data.shards}; give at most {min(height, width)}, or 0 for the whole patch"
                )
            side = cfg.augment.resize or cfg.augment.crop or height
            check_input_side(cfg.model, side, f"{cfg.data.shards} ({width}x{height} patches)")
        self.build_train_loader(t.grad_accum_steps)
        # The run's length: its epochs (or max_steps), or what a time budget allows, planned once at
        # the end of the warmup (budget.py); until then the schedule only needs the warmup's length.
        self.budget_s = parse_duration(t.time_budget) if t.time_budget else None
        self.plan: Plan | None = None
        self.total_steps = self.configured_steps()
        schedule_steps = cfg.schedule.warmup_steps + 1 if self.budget_s else self.total_steps

        # Model, optimizer, schedule. The schedule is NOT passed through `prepare`: Accelerate
        # would step it once per process per optimizer step.
        model = build_model(cfg.model, self.num_classes, self.manifest.image_shape)
        if cfg.model.stem_init == "whiten":
            # From the first images of the train split as evaluation sees them (crop, resize, normalisation): the
            # same on every rank, and reading them moves no loader. Half a second; a resume's checkpoint then
            # replaces the weights.
            images = first_images(self.manifest, cfg.data.train_split, WHITEN_IMAGES, cfg.loader)
            whiten_stem_(model, eval_transform(torch.from_numpy(images).permute(0, 3, 1, 2), cfg.augment))
        if t.deterministic and self.device.type == "cuda":
            model = make_deterministic(model)
        if t.sync_batchnorm and self.world_size > 1:
            if self.device.type != "cuda":
                raise HistoDistError(
                    "train.sync_batchnorm: SyncBatchNorm runs on GPUs only; on CPU ranks each rank keeps its own "
                    "BatchNorm statistics (docs/architecture.md says what that means); set it to false"
                )
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg.optim)
        self.schedule = LRSchedule(optimizer, cfg.schedule, schedule_steps)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        # Compiled after DDP wraps it (so communication overlaps the backward); checkpoints, EMA and
        # evaluation use the plain module (`self.module`), so the keys never carry _orig_mod.
        self.module = acc.unwrap_model(self.model)
        if t.compile:
            self.model = torch.compile(self.model)
        self.ema = EMA(self.module, t.ema_decay) if t.ema_decay > 0 else None
        if self.num_classes == 2:
            self.loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(cfg.loss.pos_weight, device=self.device))
        else:
            self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)

        self.checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
        self.validator = Validator(cfg.data.valid_split, t.eval_every_steps, t.best_metric, t.early_stopping_patience)
        self.step = 0  # optimizer steps done
        self.skipped_samples = 0  # corrupt training samples skipped over the run, all ranks (loader.skip_corrupt)
        self._pending_losses: list[tuple[int, torch.Tensor]] = []  # (step, [loss, accuracy]) on the device
        self._pending_skipped = 0  # corrupt samples this rank skipped since the last flush (host)
        self._scaler_skipped: set[int] = set()  # steps whose update fp16's gradient scaler skipped (inf/NaN)
        self._micro = 0  # micro-batch within the current optimizer step
        self._pending_keys: list[tuple[int, int, list[str]]] = []  # (epoch, step, keys) for tracking.log_samples
        self.preemption = PreemptionFlag()
        self._timing: tuple[int, float] | None = None  # (step, time) where the budget's step timing starts
        self._paused_s = 0.0  # seconds since then spent validating and checkpointing (not in a step's time)
        self._validations_s: list[float] = []  # each validation since then, its checkpoint included
        self.resumed_at = 0  # the step this process resumed at (0: it started the run)

    def build_train_loader(self, accumulation: int) -> None:
        """This rank's training loader: micro-batches of loader.batch_size, `accumulation` per optimizer step."""
        cfg = self.cfg
        worker_aug = cfg.augment.enabled and cfg.augment.where == "worker" and not self.manifest.embeddings
        self.train_loader = split_loader(
            self.manifest,
            cfg.data.train_split,
            cfg.loader,
            rank=self.rank,
            world_size=self.world_size,
            seed=cfg.train.seed,
            training=True,
            accumulation=accumulation,
            transform=_WorkerAugment(cfg.augment) if worker_aug else None,
            device_type=self.device.type,
        )
        self.accelerator.gradient_accumulation_steps = accumulation
        self.micro_per_epoch = len(self.train_loader)
        self.steps_per_epoch = self.train_loader.steps

    def configured_steps(self) -> int:
        """The run's length in optimizer steps: its epochs (capped by max_steps), or UNPLANNED under a time budget."""
        if self.budget_s:
            return UNPLANNED
        t = self.cfg.train
        return min(self.steps_per_epoch * t.epochs, t.max_steps or sys.maxsize)

    def keep_global_batch(self, global_batch: int, path: Path) -> None:
        """Resuming on another number of ranks (elastic resume): the optimizer must keep seeing the checkpoint's
        global batch, so the accumulation is adjusted to it; without a whole number that does, refuse naming the
        settings that would work."""
        ranks, micro = self.world_size, self.cfg.loader.batch_size
        per_rank, rest = divmod(global_batch, ranks)
        if rest == 0 and per_rank % micro == 0:
            accumulation = per_rank // micro
            log.info(
                "resuming %s on %d rank(s): gradient accumulation %d (configured %d) keeps its global batch of %d",
                path,
                ranks,
                accumulation,
                self.cfg.train.grad_accum_steps,
                global_batch,
            )
            self.build_train_loader(accumulation)
            self.total_steps = self.configured_steps()  # (the same steps per epoch as the checkpoint's run)
            if not self.budget_s:
                self.schedule.set_total_steps(self.total_steps)
            return
        if rest:
            hint = (
                f"{global_batch} samples do not split over {ranks} ranks; resume on a number of ranks that "
                f"divides {global_batch}"
            )
        else:
            pairs = [
                f"loader.batch_size={b} train.grad_accum_steps={per_rank // b}"
                for b in range(1, per_rank + 1)
                if per_rank % b == 0
            ][-3:]
            hint = f"on {ranks} rank(s) that is {per_rank} per rank: e.g. {'; '.join(reversed(pairs))}"
        raise HistoDistError(
            f"cannot resume {path} exactly: its global batch is {global_batch} (batch_size x grad_accum_steps x "
            f"ranks), and loader.batch_size={micro} on {ranks} rank(s) cannot make it: {hint}; or start a new run "
            f"from its weights: {new_run(path, self.cfg.model.stem_init)}"
        )

    # -- one micro-batch ---------------------------------------------------------------------------
    def prepare_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Move a training batch to the device and finish augmentation/normalisation there."""
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        if images.dim() == 2:  # embeddings
            return images.float(), labels
        if images.dtype == torch.uint8:  # not yet augmented in a worker
            if self.cfg.augment.enabled:
                images = augment(images, batch["seed"].to(self.device, non_blocking=True), self.cfg.augment)
            else:
                images = eval_transform(images, self.cfg.augment)
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
        _seed_step(_step_seed(self.cfg.train.seed, self.rank, self.step, self._micro), self.device)
        images, labels = self.prepare_inputs(batch)
        # Only after an evaluation switched the plain module to eval mode: walking the modules every step would
        # cost as much as a step of a head on embeddings. (Wrappers keep their own flag: ask the module.)
        if not self.module.training:
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
            if acc.sync_gradients:  # what Accelerate's zero_grad does, without its inspect.signature per step
                self.optimizer.optimizer.zero_grad(set_to_none=True)
        # Kept on the device: checking them here would be a CPU-GPU sync point every step.
        with torch.no_grad():
            predicted = (logits.reshape(-1) > 0).long() if self.num_classes == 2 else logits.argmax(1)
            accuracy = (predicted == labels).float().mean() if len(labels) else torch.zeros((), device=self.device)
        self._pending_losses.append((self.step + 1, torch.stack([loss.detach().float(), accuracy])))
        self._pending_skipped += batch.get("skipped", 0)
        if self.cfg.tracking.log_samples:
            self._pending_keys.append((self.train_loader.epoch, self.step + 1, list(batch["key"])))
        if not acc.sync_gradients:
            self._micro += 1
            return False
        self._micro = 0
        # fp16: Accelerate has read the gradient scaler (a sync it makes anyway); a skipped update moves neither
        # the schedule nor the average, and its inf/NaN loss is the scaler's business, not an error.
        if self.optimizer.step_was_skipped:
            self._scaler_skipped.add(self.step + 1)
        else:
            self.schedule.after_optimizer_step()
            if self.ema is not None:
                self.ema.update(self.module)
        self.step += 1
        return True

    def flush_losses(self) -> tuple[float, float]:
        """Mean training loss and accuracy since the last flush over all ranks; raises if a loss
        was NaN/inf; adds the samples skipped as corrupt to `skipped_samples`. This is the loop's sync
        point (once per log interval, not per step)."""
        if not self._pending_losses:
            return float("nan"), float("nan")
        steps = [s for s, _ in self._pending_losses]
        values = torch.stack([v for _, v in self._pending_losses]).flatten()
        skipped = torch.tensor([float(self._pending_skipped)], device=values.device)  # one host-device copy
        sums = self.accelerator.reduce(torch.cat([values, skipped]), "sum").cpu()  # the sync point
        self._pending_losses.clear()
        self._pending_skipped = 0
        if self.cfg.tracking.log_samples:
            self._write_sample_log()
        self.skipped_samples += round(float(sums[-1]))
        losses, accuracies = (sums[:-1].view(-1, 2) / self.world_size).unbind(1)
        bad = [
            i for i in (~torch.isfinite(losses)).nonzero().flatten().tolist() if steps[i] not in self._scaler_skipped
        ]
        self._scaler_skipped.clear()
        if bad:
            step = steps[bad[0]]
            last = self.checkpointer.newest_valid()
            raise NonFiniteLossError(
                f"loss is {losses[bad[0]].item()} at optimizer step {step}: stopping. "
                f"Last good checkpoint: {last or 'none yet'} (lower optim.lr, enable train.clip_grad_norm, "
                "or check the data)"
            )
        finite = torch.isfinite(losses)
        return float(losses[finite].mean()), float(accuracies[finite].mean())

    def _write_sample_log(self) -> None:
        """tracking.log_samples: every rank's keys since the last flush, by (epoch, step), to RUN/samples.jsonl
        (an all-gather of strings: once per log interval, and only when asked for)."""
        parts, self._pending_keys = gather_objects(self._pending_keys), []
        if not self.accelerator.is_main_process:
            return
        steps: dict[tuple[int, int], list[str]] = {}
        for epoch, step, keys in (record for part in parts for record in part):
            steps.setdefault((epoch, step), []).extend(keys)
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for (epoch, step), keys in sorted(steps.items()):
                f.write(
                    json.dumps({"epoch": epoch, "step": step, "world_size": self.world_size, "keys": sorted(keys)})
                    + "\n"
                )

    # -- evaluation --------------------------------------------------------------------------------
    def inference_model(self) -> InferenceModel:
        """The weights to evaluate (the EMA average when kept), as evaluation.py takes them: the plain
        module, not the DDP wrapper (no buffer broadcast per forward, no collective a rank could miss)."""
        module = self.ema.module if self.ema is not None else self.module
        return InferenceModel(
            module,
            self.num_classes,
            tuple(self.manifest.label_names),
            tuple(self.manifest.image_shape),
            self.cfg.augment,
            self.cfg.train.channels_last,
            self.cfg.model.name,
            weights="ema" if self.ema is not None else "model",
            step=self.step,
        )

    def sync_eval_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics of the evaluated weights (a collective): each rank's
        own come from its own batches, and rank 0's are the ones a checkpoint keeps."""
        broadcast_buffers(self.ema.module if self.ema is not None else self.module, self.world_size)

    def _where(self) -> dict[str, Any]:
        return dict(rank=self.rank, world_size=self.world_size, device=self.device, autocast=self.accelerator.autocast)

    def valid_metrics(self) -> dict[str, Any]:
        """Metrics of the current weights on the validation split (every rank calls this; all get them)."""
        self.sync_eval_buffers()
        return validate_split(
            self.inference_model(), self.manifest, self.validator.split, self.cfg.loader, **self._where()
        )

    def validate(self, run_log: RunLog, epoch: int) -> bool:
        """Validate (every rank); True when this is the best validation so far."""
        self.flush_losses()
        values = self.valid_metrics()
        improved = self.validator.record(values)
        self.schedule.after_validation(values[self.validator.metric])
        record = {k: v for k, v in values.items() if k not in ("confusion_matrix", "threshold")}
        if not self.cfg.loader.skip_corrupt:
            del record["skipped_samples"]
        run_log.log(
            {**record, "epoch": epoch, f"best_{self.validator.metric}": self.validator.best}, self.step, "valid"
        )
        log.info(
            "step %d valid %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float))
        )
        if self.validator.stop_early:
            log.info(
                "early stopping: %s has not improved for %d validations", self.validator.metric, self.validator.patience
            )
        return improved

    def test(self, run_log: RunLog) -> dict[str, Any]:
        """Evaluate the best checkpoint (the last one without validation) on the test split, as
        `histo-dist evaluate --checkpoint THAT --threshold <test.threshold>` does, into RUN/test/."""
        split = self.cfg.data.test_split
        if not split:
            return {}
        checkpoint = self.checkpointer.folder / "best.pt"
        if not checkpoint.exists():
            checkpoint = self.checkpointer.newest_valid()
        state = read_training_checkpoint(checkpoint)
        weights, which = model_weights(state, "auto", checkpoint)
        model = self.inference_model()
        model.model.load_state_dict(weights)  # rank 0's checkpoint: its buffers on every rank
        model.step = int(state["step"])
        info = {
            "checkpoint": str(checkpoint),
            "step": model.step,
            "model": model.model_name,
            "weights": which,
            "data": str(self.manifest.root),
        }
        if self.cfg.loader.skip_corrupt:
            info["train_skipped_samples"] = self.skipped_samples
        results, predictions = evaluate_split(
            model,
            self.manifest,
            split,
            self.cfg.test,
            self.cfg.loader,
            threshold_split=self.cfg.data.valid_split,
            info=info,
            show_progress=self.cfg.tracking.progress,
            **self._where(),
        )
        if self.accelerator.is_main_process:
            images = write_evaluation(
                self.run_dir / "test",
                results,
                predictions,
                plots=self.cfg.test.plots,
                metrics_jsonl=self.run_dir / "metrics.jsonl",
            )
            values = scalars(results)
            run_log.log(values, self.step, "test")
            run_log.summary({f"test/{k}": v for k, v in values.items()})
            run_log.log_images({f"test/{k}": p for k, p in images.items()}, self.step)
        self.accelerator.wait_for_everyone()
        return results

    # -- time budget -------------------------------------------------------------------------------
    def follow_budget(self, run_log: RunLog, bar) -> None:
        """(train.time_budget) Time the warmup's steps; at its end, plan the run's length; at each plan's
        `replan_at_step`, plan it again from the steps since the last plan (budget.py). Every rank calls this
        after every optimizer step until the plan is final; all get rank 0's plan."""
        warmup = self.cfg.schedule.warmup_steps
        if self.plan is None:
            if self._timing is None:  # the warmup's first quarter (<= UNTIMED_WARMUP_STEPS) is start-up, not throughput
                untimed = min(warmup // 4, budget.UNTIMED_WARMUP_STEPS)
                if self.step >= min(max(untimed, self.resumed_at + 1), warmup - 1) or self.step == warmup:
                    self._time_from_here()
                return
            # The first plan comes as soon as MIN_CALIBRATION_STEPS are timed, inside the warmup: a budget too short
            # for the warmup learns it in time to cut it (budget.cut_warmup), and a slow machine soon knows how slow.
            if self.step >= warmup or self.step == self._timing[0] + budget.MIN_CALIBRATION_STEPS:
                self.plan_run(run_log, bar)
            return
        if self._timing is None:  # resumed between two plans
            self._time_from_here()
        if self.step == self.plan.replan_at_step:
            self.plan_run(run_log, bar)

    def _time_from_here(self) -> None:
        """Time the budget's steps from this one: pauses and validations before it no longer count."""
        self._timing = (self.step, self._synchronized_now())
        self._paused_s, self._validations_s = 0.0, []

    def _timed_step_s(self) -> float:
        """Seconds per optimizer step since `_timing`, validations and checkpoints left out."""
        start_step, start = self._timing
        return (self._synchronized_now() - start - self._paused_s) / max(1, self.step - start_step)

    def plan_run(self, run_log: RunLog, bar) -> None:
        """Plan from the steps timed since `_timing` (validations and checkpoints left out) on rank 0, and give
        every rank that plan. Each times an evaluation batch too, and the least of those timings so far prices the
        test; each plan prices a validation at what those timed since `_timing` took (their loader
        start-up and checkpoint included), else as the plan before priced it, else by that forward pass. A plan that
        is not final is made again at its `replan_at_step`."""
        from accelerate.utils import broadcast_object_list

        plan = [None]
        if self.accelerator.is_main_process:
            step_s = self._timed_step_s()
            if self.plan is not None and self.step - self._timing[0] < budget.MIN_CALIBRATION_STEPS:
                step_s = self.plan.step_s  # too few steps timed since a resume: keep the last plan's speed
            v, test = self.cfg.data.valid_split, self.cfg.data.test_split
            valid_samples = self.manifest.split(v).num_samples // self.world_size if v else 0
            test_samples = (self.manifest.split(test).num_samples // self.world_size if test else 0) + (
                valid_samples if test and self.cfg.test.threshold_method else 0
            )
            validation_s = statistics.fmean(self._validations_s) if self._validations_s else None
            if validation_s is None and self.plan is not None:
                validation_s = self.plan.validation_s  # no validation since the last plan: price it as that one did
            # The test's price: the least of an evaluation batch's timings at every plan so far. One timing can be
            # slowed for its second by the loader's worker or the machine; one at step 60 priced a 300 s run's test
            # at 38 s, and it took 19. Each later plan times one pass (about half a second on two CPU cores).
            eval_s, view_s = self._eval_seconds_per_sample(passes=2 if self.plan is None else 1)
            if self.plan is not None:
                eval_s = min(eval_s, self.plan.eval_s_per_sample)
                view_s = min(view_s, self.plan.view_s_per_sample or math.inf)
            new = make_plan(
                budget_s=self.budget_s,
                step=self.step,
                elapsed_s=budget.process_age(),
                step_s=step_s,
                eval_s_per_sample=eval_s,
                view_s_per_sample=view_s,
                validation_s=validation_s,
                steps_per_epoch=self.steps_per_epoch,
                eval_every_steps=self.cfg.train.eval_every_steps,
                valid_samples=valid_samples,
                test_samples=test_samples,
                test_views=8 if self.cfg.test.tta else 1,
                max_steps=self.cfg.train.max_steps,
            )
            new.replan_at_step = replan_step(new, self.cfg.schedule.warmup_steps, first=self.plan is None)
            # A warmup longer than half the run would leave few steps to decay in: the first plan cuts it (the
            # 1-minute runs of the CPU recipe ended at or inside their 60-step warmup, the learning rate still high).
            if self.plan is not None:
                new.warmup_end = self.plan.warmup_end  # a cut, once made, holds: the steps after it have decayed
            else:
                warmup = self.cfg.schedule.warmup_steps
                new.warmup_end = budget.cut_warmup(self.step, new.total_steps, warmup)
                if new.warmup_end is not None:
                    log.warning(
                        "schedule.warmup_steps=%d is more than half of the %d optimizer steps planned for the %.0f s "
                        "time budget: the warmup ends at step %d, and the learning rate decays from there; give "
                        "fewer warmup steps or a larger budget for a whole warmup",
                        warmup,
                        new.total_steps,
                        self.budget_s,
                        new.warmup_end,
                    )
            new.final = not new.replan_at_step
            plan = [new.to_dict()]
        broadcast_object_list(plan)  # every rank takes the same number of steps
        self.set_plan(Plan.from_dict(plan[0]))
        if self.plan.final:
            self._timing = None  # no more plans: steps, validations and checkpoints are no longer timed
        else:
            self._time_from_here()
        bar.total = self.total_steps
        bar.refresh()
        if self.accelerator.is_main_process:
            write_atomic(self.run_dir / "plan.json", json.dumps(plan[0], indent=2) + "\n")
            run_log.log(plan[0], self.step, "plan")
            (log.warning if self.total_steps == self.step else log.info)("%s", self.plan.describe())

    def set_plan(self, plan: Plan) -> None:
        self.plan = plan
        self.total_steps = plan.total_steps
        self.schedule.set_total_steps(plan.total_steps, plan.warmup_end)

    def _synchronized_now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # a sync point, twice per run: GPU work is asynchronous
        return budget.now()

    @torch.no_grad()
    def _eval_seconds_per_sample(self, passes: int) -> tuple[float, float]:
        """One rank's seconds per evaluated sample: (its input prepared and one view through the model, the
        model's forward pass alone), each the least of `passes` timings on a batch of random patches, with a
        quarter more for reading and gathering. A TTA view costs only the forward pass: the test prepares each
        batch once (the 96 -> 64 px resize and normalisation: a fifth of a forward pass on two CPU cores)."""
        model = self.inference_model()
        n, shape = self.cfg.loader.eval_batch_size, self.manifest.image_shape
        generator = torch.Generator().manual_seed(0)
        if self.manifest.embeddings:
            images = torch.randn((n, *shape), generator=generator).half()
        else:
            h, w, c = shape
            images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=generator)
        images = images.to(self.device)
        prepare, forward = math.inf, math.inf
        for _ in range(passes):
            start = self._synchronized_now()
            with self.accelerator.autocast():
                x = model.inputs(images)
                prepared = self._synchronized_now()
                model.probabilities(x)
            end = self._synchronized_now()
            prepare, forward = min(prepare, prepared - start), min(forward, end - prepared)
        return (prepare + forward) / n * 1.25, forward / n * 1.25

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        acc = self.accelerator
        state = {
            "step": self.step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "loader": self.train_loader.state_dict(),
            "best": self.validator.best,
            "evals_without_improvement": self.validator.evals_without_improvement,
            "skipped_samples": self.skipped_samples,
            "config": to_dict(self.cfg),
            "num_classes": self.num_classes,
            "label_names": list(self.manifest.label_names),
            "image_shape": list(self.manifest.image_shape),
            "plan": self.plan.to_dict() if self.plan else None,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if acc.scaler is not None:
            state["scaler"] = acc.scaler.state_dict()
        return state

    def save_checkpoint(self, is_best: bool = False) -> None:
        """Every rank calls this: losses are flushed (never checkpoint weights from a NaN step), the
        main process writes, and the others wait for it."""
        self.flush_losses()
        if self.accelerator.is_main_process:
            path = self.checkpointer.save(self.step, self.state_dict(), is_best=is_best)
            log.info("checkpoint %s%s", path, " (best)" if is_best else "")
        self.checkpointer.last_saved_step = self.step
        self.accelerator.wait_for_everyone()

    def load(self, path: Path) -> None:
        """Continue the run from checkpoint `path` (every rank). Refused, before anything is loaded, when the
        config changes a value the checkpoint's state was made with."""
        state = read_training_checkpoint(path)  # to CPU; load_state_dict copies onto the device
        check_resumable(
            state["config"],
            self.cfg,
            f"{path}",
            f"start a new run from its weights: {new_run(path, self.cfg.model.stem_init)}",
        )
        acc = self.accelerator
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        loader_state = state["loader"]  # rank 0 saved it; positions are global (any number of ranks)
        if loader_state.get("global_batch") not in (None, self.train_loader.global_batch):
            self.keep_global_batch(int(loader_state["global_batch"]), path)
        try:
            self.train_loader.load_state_dict(loader_state)
        except HistoDistError as e:
            raise HistoDistError(
                f"{path}: {e}, or start a new run from its weights: {new_run(path, self.cfg.model.stem_init)}"
            ) from None
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if acc.scaler is not None and "scaler" in state:
            acc.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.validator.best = state["best"]
        self.validator.evals_without_improvement = int(state["evals_without_improvement"])
        self.skipped_samples = int(state.get("skipped_samples", 0))
        if state.get("plan"):
            self.set_plan(Plan.from_dict(state["plan"]))  # a budgeted run keeps the length it planned
        elif self.budget_s and self.step >= self.cfg.schedule.warmup_steps:
            raise HistoDistError(
                f"{path}: written at step {self.step} without a time budget's plan; a time budget "
                "applies to a run from its start (start a new run, or resume without train.time_budget)"
            )
        self.resumed_at = self.step
        log.info(
            "resumed from %s at step %d (epoch %d, sample %d)",
            path,
            self.step,
            loader_state["epoch"],
            loader_state["samples"],
        )

    def preempted(self) -> bool:
        """True on every rank when any rank got a preemption signal. With several ranks this is a tiny
        all-reduce (a sync point), so that all ranks stop at the same step."""
        flag = self.preemption.signal is not None
        if self.world_size == 1:
            return flag
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "max").item())

    # -- the loop ----------------------------------------------------------------------------------
    def log_progress(self, run_log: RunLog, bar, epoch: int) -> None:
        """Every `log_every_steps`: the mean loss and accuracy since the last log (a sync point), lr, images/s."""
        bar.update(1)
        if self.step % self.cfg.tracking.log_every_steps:
            return
        loss, accuracy = self.flush_losses()
        now = time.perf_counter()
        global_batch = self.train_loader.global_batch
        images_per_s = (self.step - self._tick[1]) * global_batch / (now - self._tick[0])
        self._tick = (now, self.step)
        record = {
            "loss": loss,
            "accuracy": accuracy,
            "lr": self.optimizer.param_groups[-1]["lr"],
            "images_per_s": images_per_s,
            "epoch": epoch,
        }
        if self.cfg.loader.skip_corrupt:
            record["skipped_samples"] = self.skipped_samples
        run_log.log(record, self.step, "train")
        bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}")

    def fit(self, run_log: RunLog) -> dict[str, Any]:
        from tqdm import tqdm

        bar = tqdm(
            total=None if self.total_steps == UNPLANNED else self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (self.accelerator.is_main_process and self.cfg.tracking.progress),
            dynamic_ncols=True,
        )
        self._tick = (time.perf_counter(), self.step)
        # (A run preempted right after early stopping said stop resumes straight into the test.)
        finished = self.step >= self.total_steps or self.validator.stop_early
        while not finished:
            epoch = self.train_loader.epoch
            for batch in self.train_loader:
                if self.train_loader.batch > self.micro_per_epoch:  # the epoch is cut to whole optimizer steps
                    break
                if not self.train_step(batch):
                    continue
                if self.budget_s and not (self.plan and self.plan.final):
                    self.follow_budget(run_log, bar)
                self.log_progress(run_log, bar, epoch)
                end_of_epoch = self.train_loader.batch >= self.micro_per_epoch
                if end_of_epoch:
                    self.train_loader.set_epoch(epoch + 1)  # the saved position is the next epoch's start
                last_step = self.step >= self.total_steps
                validated = self.validator.due(self.step, end_of_epoch=end_of_epoch, last_step=last_step)
                saved = self.checkpointer.due(
                    self.step, end_of_epoch=end_of_epoch, validated=validated, last_step=last_step
                )
                timing = self._timing is not None and (validated or saved)  # not training time: left out
                paused_at = self._synchronized_now() if timing else 0.0
                is_best = validated and self.validate(run_log, epoch)
                if saved:
                    self.save_checkpoint(is_best)
                if timing:
                    paused = self._synchronized_now() - paused_at
                    self._paused_s += paused
                    if validated:
                        self._validations_s.append(paused)
                # Only after this step's validation and checkpoint: a run preempted between a step and
                # its validation would resume past that validation, and could pick another best checkpoint.
                # With several ranks, agreeing on it is a collective (a GPU sync point), so it is asked at
                # the steps that sync anyway: logging, checkpoints (after validations and the last step).
                ask = self.world_size == 1 or saved or self.step % self.cfg.tracking.log_every_steps == 0
                if ask and self.preempted():
                    if self.checkpointer.last_saved_step != self.step:
                        self.save_checkpoint()
                    self.preemption.ignore()
                    log.warning(
                        "preempted (%s): checkpoint at step %d written; exiting with code %d for requeue",
                        self.preemption.signal or "signal on another rank",
                        self.step,
                        EXIT_PREEMPTED,
                    )
                    raise Preempted()
                finished = last_step or self.validator.stop_early
                if finished or end_of_epoch:
                    break
        bar.close()
        return self.test(run_log)


def build_accelerator(cfg: ExperimentConfig):
    """The Accelerator of a run (DDP, mixed precision, gradient accumulation, W&B), in deterministic mode if asked."""
    import accelerate.optimizer
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    # Accelerate's optimizer wrapper asks importlib whether lomo_optim is installed twice per optimizer step: a
    # search of sys.path, 1-2 ms per step on a busy machine (more than a step of a head on embeddings); the
    # answer does not change while the process runs.
    if not hasattr(accelerate.optimizer.is_lomo_available, "cache_info"):
        accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)
    t = cfg.train
    if t.cpu_threads:
        torch.set_num_threads(t.cpu_threads)
    use_cpu = t.cpu or not torch.cuda.is_available()
    if use_cpu and t.cpu_keep_freed_memory and keep_freed_memory():
        log.info("train.cpu_keep_freed_memory: malloc keeps freed memory for reuse (no mmap, no trimming)")
    if t.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return Accelerator(
        cpu=use_cpu,
        mixed_precision=resolve_precision(t.mixed_precision, use_cpu),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.dist_timeout_s))],
        # Our loaders are not `prepare`d, so accumulation syncs every k micro-batches, never on a
        # dataloader end it cannot see; epochs are cut to multiples of k (Trainer).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=t.grad_accum_steps, sync_with_dataloader=False
        ),
        log_with="wandb" if cfg.tracking.wandb and cfg.tracking.mode != "disabled" else None,
    )


class _WorkerAugment:
    """Picklable transform for loader workers: augmentation on the CPU, per sample."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg

    def __call__(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return augment(images, seeds, self.cfg)


# ---------------------------------------------------------------------------------------------


def train(
    cfg: ExperimentConfig, run_dir: Path | None, config_path: str | None = None, fresh: bool = False
) -> dict[str, Any]:
    """The whole run on this process's rank, or one run per seed of train.seeds (`train_seeds`); returns the test
    results (complete on the main process)."""
    from accelerate.utils import broadcast_object_list

    acc = build_accelerator(cfg)
    setup_logging(acc.process_index, acc.num_processes)
    chosen = [str(run_dir or default_run_dir(config_path))]
    broadcast_object_list(chosen)  # the main process's timestamp names the run on every rank
    try:
        if cfg.train.seeds:
            return train_seeds(cfg, Path(chosen[0]), acc, fresh)
        return _train_run(cfg, Path(chosen[0]), acc, fresh)
    finally:
        _end_training(acc)


def train_seeds(cfg: ExperimentConfig, run_dir: Path, acc, fresh: bool = False) -> dict[str, Any]:
    """One run per seed of train.seeds in RUN/seed-<seed>/ (the same config with train.seed=seed; each resumes on
    its own; --fresh applies to each), then the mean and spread of their test metrics in RUN/seeds.json (main
    process), returned."""
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        where = dict(world_size=acc.num_processes, device_type=acc.device.type, mixed_precision=acc.mixed_precision)
        write_run_files(run_dir, cfg, provenance(**where, manifest=Manifest.load(cfg.data.shards)))
    results = {}
    for seed in cfg.train.seeds:
        one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, seeds=()))
        results[seed] = _train_run(one, run_dir / f"seed-{seed}", acc, fresh)
        _finish_trackers(acc)  # one W&B run per seed
        acc.free_memory()  # the next run prepares its own model and optimizer
    summary = summarize_seeds(results, cfg.data.test_split)
    if acc.is_main_process:
        write_atomic(run_dir / "seeds.json", json.dumps(summary, indent=2) + "\n")
        log.info("%d seeds: %s", len(results), run_dir / "seeds.json")
    return summary


def summarize_seeds(results: dict[int, dict[str, Any]], split: str) -> dict[str, Any]:
    """Mean, standard deviation (n - 1), min and max over seeds of every single-number test metric."""
    per_seed = {seed: scalars(r) for seed, r in results.items()}
    names = [k for k in next(iter(per_seed.values()), {}) if k != "skipped_samples"]
    metrics = {}
    for name in names:
        values = torch.tensor([float(v[name]) for v in per_seed.values()], dtype=torch.float64)
        std = float(values.std()) if len(values) > 1 else 0.0
        metrics[name] = {
            "mean": float(values.mean()),
            "std": std,
            "min": float(values.min()),
            "max": float(values.max()),
            "values": values.tolist(),
        }
    return {"split": split, "seeds": list(results), "runs": [f"seed-{s}" for s in results], "metrics": metrics}


def _train_run(cfg: ExperimentConfig, run_dir: Path, acc, fresh: bool = False) -> dict[str, Any]:
    """One run in `run_dir` on this process's rank; returns the test results (complete on the main process).

    A start writes nothing into the run directory until every check has passed: the directory is free
    (the lock), no earlier run would be mixed with this one, and a resume accepts the config and the
    loader's position. A refused start leaves the directory as it was."""
    claim = RunDirClaim(run_dir)

    def decide() -> str | None:  # first, before data and model are built: a busy directory fails at once
        claim.take()
        return choose_resume(run_dir, cfg, Checkpointer(run_dir / "checkpoints", cfg.checkpoint), fresh)

    try:
        resume = _main_decides(acc, decide)
        trainer = Trainer(cfg, run_dir, acc)
        if resume is not None:
            trainer.load(Path(resume))
        if acc.is_main_process:
            if fresh and earlier_run(run_dir):
                claim.move_earlier_run_aside()
            write_run_files(
                run_dir,
                cfg,
                provenance(
                    world_size=acc.num_processes,
                    device_type=acc.device.type,
                    mixed_precision=acc.mixed_precision,
                    manifest=trainer.manifest,
                ),
            )
            keep_records_until(run_dir / "metrics.jsonl", trainer.step)
        claim.started()
        acc.wait_for_everyone()
        return _run(trainer, run_dir)
    finally:
        claim.close()


def _run(trainer: Trainer, run_dir: Path) -> dict[str, Any]:
    cfg, acc = trainer.cfg, trainer.accelerator
    run_log = RunLog(acc, run_dir, cfg.tracking, to_dict(cfg))
    trainer.preemption.install()
    results = trainer.fit(run_log)
    if acc.is_main_process:
        log.info("run finished: %s", run_dir)
        if trainer.budget_s and not trainer.resumed_at:  # a resumed run's budget began in an earlier process
            overran, message = budget.spent(trainer.budget_s, budget.process_age())
            (log.warning if overran else log.info)("%s", message)
        if cfg.loader.skip_corrupt:
            log.warning(
                "corrupt samples skipped (loader.skip_corrupt): %d in training%s; the warnings above name them",
                trainer.skipped_samples,
                f", {results.get('skipped_samples', 0)} in the test split" if results else "",
            )
        if results:
            log.info(
                "test (%s): %s",
                run_dir / "test" / "metrics.json",
                " ".join(f"{k}={v:.4f}" for k, v in scalars(results).items() if isinstance(v, float)),
            )
    return results


def _main_decides(acc, decide: Callable[[], Any]) -> Any:
    """`decide()` on the main process only; every rank returns its result, or raises its error, so a
    refusal on the main process stops every rank (none is left waiting in a collective)."""
    from accelerate.utils import broadcast_object_list

    box, error = [None, None], None
    if acc.is_main_process:
        try:
            box[0] = decide()
        except HistoDistError as e:
            box[1], error = str(e), e
    broadcast_object_list(box)
    if error is not None:
        raise error
    if box[1] is not None:
        raise HistoDistError(box[1])
    return box[0]


def new_run(checkpoint: Path, stem_init: str = "default") -> str:
    """The command-line words of a new run that starts from `checkpoint`'s weights (which include the stem: a
    whitened one is not made again)."""
    return f"--run-dir NEW_DIR model.init_from={checkpoint}" + (
        " model.stem_init=default" if stem_init != "default" else ""
    )


def check_resumable(old: dict[str, Any], cfg: ExperimentConfig, source: str, way_forward: str) -> None:
    """Refuse to continue a run whose config `old` differs from `cfg` in values its state was made with
    (naming each); log the changes that apply on resume."""
    allowed, refused = resume_changes(old, cfg)
    if refused:
        raise HistoDistError(
            f"{source}: cannot resume with {'; '.join(refused)} (the run's state was made with the first value, "
            f"and only {', '.join(p.rstrip('.') + ('.*' if p.endswith('.') else '') for p in RESUMABLE)} may "
            f"change on resume). Resume with the run's values, or {way_forward}"
        )
    if allowed:
        log.info("resuming with changed settings: %s", "; ".join(allowed))


def choose_resume(run_dir: Path, cfg: ExperimentConfig, checkpointer: Checkpointer, fresh: bool) -> str | None:
    """(main process) The checkpoint this start continues (`checkpoint.resume`), or None for a new run.
    A start that would mix two runs in `run_dir` is refused."""
    earlier, resume = earlier_run(run_dir), cfg.checkpoint.resume
    held = f"{run_dir}: holds an earlier run ({', '.join(earlier)})"
    if fresh:
        if resume not in ("auto", "never"):
            raise RunDirError(
                f"--fresh starts a new run and checkpoint.resume={resume} continues one; to start a new run "
                f"from that checkpoint's weights give model.init_from={resume}"
            )
        return None
    if resume == "never":
        if earlier:
            raise RunDirError(
                f"{held}, and checkpoint.resume=never starts a new one: give a new --run-dir, or add --fresh to "
                f"move the earlier run aside to {run_dir}.old-<time>"
            )
        return None
    if resume == "auto":
        path = checkpointer.newest_valid()
        if path is None and earlier:
            _restart(run_dir, cfg, held)
        return None if path is None else str(path)
    path = check_input(resume, "checkpoint.resume", "file")
    if earlier and path.resolve().parent != (run_dir / "checkpoints").resolve():
        raise RunDirError(f"{held}; continuing {path} of another run here would mix the two: give a new --run-dir")
    return str(path)


def _restart(run_dir: Path, cfg: ExperimentConfig, held: str) -> None:
    """resume=auto in a run directory without a valid checkpoint (killed before its first): the same
    run starts again from step 0, if the config is the run's."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise RunDirError(
            f"{held} but neither a valid checkpoint nor its config.yaml: give a new --run-dir, or add --fresh to "
            f"move it aside to {run_dir}.old-<time>"
        )
    check_resumable(
        to_dict(load_experiment(config)),
        cfg,
        f"{config}",
        f"start a new run: a new --run-dir, or --fresh to move this one aside to {run_dir}.old-<time>",
    )
    log.warning("%s: no valid checkpoint to resume from; the run starts again from step 0", run_dir)


def _finish_trackers(acc) -> None:
    """Close this run's W&B run, keeping the process group (another run follows on the same Accelerator)."""
    try:
        for tracker in acc.trackers:
            tracker.finish()
    except Exception as e:  # noqa: BLE001 - a dead tracker must not stop the next run
        log.warning("closing the trackers failed (%s: %s)", type(e).__name__, e)
    acc.trackers = []


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
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start a new run in --run-dir even if it holds one: the earlier run is moved aside to RUN.old-<time>",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--help-config",
        nargs="?",
        const="",
        metavar="SECTION",
        help="list every config value (or those of one SECTION: "
        "data, loader, augment, model, loss, optim, schedule, train, test, checkpoint, tracking) "
        "with its type, default and meaning, and exit",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides of config values, e.g. optim.lr=0.01 loader.batch_size=64",
    )


def run(args: argparse.Namespace) -> int:
    from histo_dist.config import describe_config

    if args.help_config is not None:
        print(describe_config(ExperimentConfig, args.help_config or None), end="")
        return 0
    cfg = load_experiment(args.config, args.overrides)  # every config mistake surfaces here, before any data
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    Manifest.load(cfg.data.shards)  # a missing dataset is named before processes spin up
    try:
        results = train(cfg, Path(args.run_dir) if args.run_dir else None, args.config, fresh=args.fresh)
    except Preempted:
        return EXIT_PREEMPTED
    if cfg.train.seeds and results.get("metrics"):  # the main process: it alone has the metrics
        print_seeds(results)
    return 0


def print_seeds(summary: dict[str, Any]) -> None:
    metrics = summary["metrics"]
    print(f"{summary['split']} split over {len(summary['seeds'])} seeds {summary['seeds']}: mean ± std [min, max]")
    for name in ("balanced_accuracy", "auroc", "accuracy", "f1", "nll"):
        if name in metrics:
            m = metrics[name]
            print(f"  {name:<18} {m['mean']:.4f} ± {m['std']:.4f} [{m['min']:.4f}, {m['max']:.4f}]")
