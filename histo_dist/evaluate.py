"""Evaluate a trained checkpoint on a split of shards: metrics.json, predictions.csv and plots.

    histo-dist evaluate --checkpoint RUN/checkpoints/best.pt --data SHARDS --split test --output DIR
    histo-dist evaluate ... --threshold youden --tta        (threshold chosen on valid, TTA reported too)
    accelerate launch --multi_gpu --num_processes 2 -m histo_dist evaluate ...   (same numbers, 2 ranks)

Every rank reads its own part of the split (each sample exactly once across ranks); predictions
are gathered, checked against the manifest's sample count, and rank 0 computes the metrics and
writes DIR/metrics.json, DIR/predictions.csv and the plots (DIR/*.png, and to W&B when a run is
active or --wandb is given). This is the evaluation the trainer runs on the best checkpoint after
training (RUN/test/): the same options give the same metrics.json.

Binary tasks: a sample is called positive when P(positive) >= threshold. The threshold is 0.5
(or any fixed value), or chosen on another split (--threshold-split, default valid) by Youden's J
(max sensitivity + specificity - 1) or by the best F1, then applied unchanged to the evaluated
split. Candidates are the distinct probabilities on that split; ties go to the lowest (more
sensitive) threshold. Multi-class tasks predict the most probable class; precision, recall, F1,
AUROC and average precision are macro averages over classes.

With --tta, probabilities are also averaged over the 8 symmetries of the square (flips x 90-degree
rotations) and reported next to the plain ones (the "tta" section of metrics.json, with its own
threshold chosen the same way).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from histo_dist.allocator import keep_freed_memory
from histo_dist.evaluation import EvalOptions, evaluate_split, scalars, write_evaluation
from histo_dist.files import check_input, check_output
from histo_dist.inference import InferenceOptions, check_classes, check_data, load_inference_model
from histo_dist.metrics import EvaluationError, parse_threshold

log = logging.getLogger(__name__)


@dataclass
class EvalConfig(EvalOptions, InferenceOptions):
    data: str = ""
    """Shard folder (with manifest.json, written by `histo-dist convert`) holding the split."""
    split: str = "test"
    """Split of the shards to evaluate."""
    output: str = ""
    """Folder for metrics.json, predictions.csv and the plots (created if missing; an earlier evaluation there is
    replaced)."""
    threshold_split: str = "valid"
    """Split on which --threshold youden/f1 is chosen (never the evaluated split)."""
    wandb: bool = False
    """Start a W&B run (job_type=evaluate, mode from WANDB_MODE) to log metrics and plots when none is active;
    an already active run is always logged to."""
    wandb_project: str = "histo-dist"
    """W&B project of the run --wandb starts."""

    def validate(self) -> list[str]:
        problems = InferenceOptions.validate(self) + EvalOptions.validate(self)
        problems += [f"{name}: required" for name in ("data", "output") if not getattr(self, name)]
        if self.threshold_method and self.threshold_split == self.split:
            problems.append(
                f"threshold_split: the threshold must be chosen on another split than the evaluated "
                f"one ({self.split!r}), or the test numbers are optimistic"
            )
        return problems


def evaluate(cfg: EvalConfig, accelerator=None) -> dict[str, Any]:
    """Run the evaluation (every rank calls this). Returns metrics.json's content: complete on the
    main process, which alone computes metrics and writes; the other ranks get the run's details."""
    from histo_dist.config import ConfigError
    from histo_dist.manifest import Manifest

    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "evaluate options")
    spec = parse_threshold(cfg.threshold)
    check_input(cfg.checkpoint, "--checkpoint", "file")
    check_input(cfg.data, "--data")
    check_output(cfg.output, "--output", "folder")
    # Everything that can be checked without the data is, before any process group or pass.
    model = load_inference_model(cfg.checkpoint, cfg.weights)
    manifest = Manifest.load(cfg.data)
    manifest.split(cfg.split)  # names the split and the available ones
    where = str(manifest.root / "manifest.json")
    check_classes(model, manifest.num_classes, manifest.label_names, where)
    check_data(model, manifest.image_shape, where, cfg.resize)
    if cfg.tta and manifest.embeddings:
        raise EvaluationError(f"{where}: --tta averages over the symmetries of images; this dataset holds embeddings")
    if not model.binary and spec != 0.5:
        raise EvaluationError(
            f"--threshold {cfg.threshold}: thresholds apply to binary tasks; this {model.num_classes}-class "
            "model predicts the most probable class"
        )
    if isinstance(spec, str) and cfg.threshold_split not in manifest.splits:
        raise EvaluationError(
            f"{where}: --threshold {spec} chooses the threshold on split {cfg.threshold_split!r}, which is not in this "
            f"dataset (it has {', '.join(manifest.splits)}); pass --threshold-split NAME or a fixed --threshold"
        )

    own = accelerator is None
    if own:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
        if accelerator.device.type == "cpu" and cfg.cpu_keep_freed_memory:
            keep_freed_memory()  # (a trainer's accelerator comes with its own setting)
    acc = accelerator
    try:
        model.to(acc.device)
        info = {
            "checkpoint": str(cfg.checkpoint),
            "step": model.step,
            "model": model.model_name,
            "weights": model.weights,
            "data": str(manifest.root),
        }
        results, predictions = evaluate_split(
            model,
            manifest,
            cfg.split,
            cfg,
            cfg.loader_config(),
            threshold_split=cfg.threshold_split,
            rank=acc.process_index,
            world_size=acc.num_processes,
            device=acc.device,
            autocast=acc.autocast,
            resize=cfg.resize,
            info=info,
            show_progress=cfg.progress,
        )
        # The last collective is evaluate_split's gather. The main process alone then bootstraps, writes the CSV
        # and plots (a minute on a large split): no rank waits for it in a barrier that a collective timeout
        # (NCCL's 10 minutes) could break.
        if acc.is_main_process:
            run_dir = Path(cfg.checkpoint).resolve().parent.parent
            images = write_evaluation(
                Path(cfg.output), results, predictions, plots=cfg.plots, metrics_jsonl=run_dir / "metrics.jsonl"
            )
            _log_wandb(cfg, results, images)
        return results
    finally:
        if own:
            acc.end_training()


def _log_wandb(cfg: EvalConfig, results: dict[str, Any], images: dict[str, Path]) -> None:
    """Log to the active W&B run, or to one started here with --wandb."""
    active = sys.modules.get("wandb")
    run = getattr(active, "run", None) if active is not None else None
    started = False
    if run is None and cfg.wandb:
        import wandb

        run = wandb.init(
            project=cfg.wandb_project,
            job_type="evaluate",
            dir=cfg.output,
            name=f"eval-{Path(cfg.checkpoint).resolve().parent.parent.name}-{cfg.split}",
            config=asdict(cfg),
        )
        started = True
    if run is None:
        return
    import wandb

    prefix = f"eval/{cfg.split}"
    values = {f"{prefix}/{k}": v for k, v in scalars(results).items()}
    run.log({**values, **{f"{prefix}/{name}": wandb.Image(str(path)) for name, path in images.items()}})
    for k, v in values.items():
        run.summary[k] = v
    if started:
        run.finish()


def print_summary(results: dict[str, Any], out: Path) -> None:
    def line(name: str, r: dict[str, Any]) -> str:
        ci = r.get("ci95") or {}

        def fmt(k: str) -> str:
            return f"{k} {r[k]:.4f}" + (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if ci.get(k) else "")

        thr = f" at threshold {r['threshold']:.4f} ({r['threshold_method']})" if r.get("threshold") is not None else ""
        return (
            f"{name}: {fmt('auroc')}, {fmt('accuracy')}, f1 {r['f1']:.4f}, nll {r['nll']:.4f}, ece {r['ece']:.4f}{thr}"
        )

    print(f"{results['split']} ({results['num_samples']} samples, {results['model']} {results['weights']} weights):")
    print("  " + line("plain", results))
    if "tta" in results:
        print("  " + line("TTA x8", results["tta"]))
    print(f"  wrote {out / 'metrics.json'}, predictions.csv and plots")


# ---------------------------------------------------------------------------------------------
# Command line


def configure(parser: argparse.ArgumentParser) -> None:
    from histo_dist.config import add_dataclass_arguments

    add_dataclass_arguments(parser, EvalConfig, required=["checkpoint", "data", "output"])


def run(args: argparse.Namespace) -> int:
    from histo_dist.config import from_namespace

    cfg = from_namespace(EvalConfig, args, "evaluate options")
    results = evaluate(cfg)
    if "accuracy" in results:  # the main process: it alone computed the metrics
        print_summary(results, Path(cfg.output))
    return 0
