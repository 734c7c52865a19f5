"""Evaluate a trained checkpoint on a split of shards: metrics.json, predictions.csv and plots.

    histo-dist evaluate --checkpoint RUN/checkpoints/best.pt --data SHARDS --split test --output DIR
    histo-dist evaluate ... --threshold youden --tta        (threshold chosen on valid, TTA reported too)
    accelerate launch --multi_gpu --num_processes 2 -m histo_dist evaluate ...   (same numbers, 2 ranks)

Every rank reads its own part of the split (each sample exactly once across ranks); predictions
are gathered, checked against the manifest's sample count, and rank 0 computes the metrics and
writes DIR/metrics.json, DIR/predictions.csv and the plots (DIR/*.png, and to W&B when a run is
active or --wandb is given).

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
import csv
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from histo_dist.errors import HistoDistError
from histo_dist.inference import TTA_VIEWS, LoadedModel, check_classes, check_size, load_model, model_input, predict_probs

log = logging.getLogger(__name__)

THRESHOLD_METHODS = ("youden", "f1")
ECE_BINS = 15
CI_LEVEL = 0.95


class EvaluationError(HistoDistError):
    """An evaluation that cannot be done as asked (a split, a threshold, a sample count)."""


@dataclass
class EvalConfig:
    checkpoint: str = ""
    """Checkpoint file to evaluate, e.g. RUN/checkpoints/best.pt (its run's metrics.jsonl gives the learning curves)."""
    data: str = ""
    """Shard folder (with manifest.json, written by `histo-dist convert`) holding the split."""
    split: str = "test"
    """Split of the shards to evaluate."""
    output: str = ""
    """Folder for metrics.json, predictions.csv and the plots (created if missing)."""
    threshold: str = "0.5"
    """Binary tasks: decision threshold on P(positive): a number in (0, 1), or 'youden' / 'f1' to choose it on
    --threshold-split (Youden's J or best F1) and apply it unchanged to the evaluated split."""
    threshold_split: str = "valid"
    """Split on which --threshold youden/f1 is chosen (never the evaluated split)."""
    tta: bool = False
    """Also report test-time augmentation: probabilities averaged over the 8 symmetries of the square."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% confidence intervals of AUROC and accuracy (0: none)."""
    seed: int = 0
    """Seed of the bootstrap resampling (same seed, same intervals)."""
    batch_size: int = 256
    """Images per forward pass on each rank (TTA runs 8 passes per batch)."""
    num_workers: int = 1
    """Loader worker processes per rank (0 reads in the main process)."""
    resize: bool = False
    """Resize images of another size than the model was trained on (bilinear, antialiased); without it they are an error."""
    weights: Literal["auto", "model", "ema"] = "auto"
    """Which weights of the checkpoint: 'auto' takes the EMA average when the run kept one, else the model's."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision of the forward passes (GPUs)."""
    cpu: bool = False
    """Run on the CPU even when GPUs are present."""
    error_examples: int = 8
    """How many of the most confident false positives and false negatives (or errors, multi-class) to show."""
    plots: bool = True
    """Write the PNG plots (learning curves, ROC, PR, confusion matrix, reliability diagram, errors)."""
    wandb: bool = False
    """Start a W&B run (job_type=evaluate, mode from WANDB_MODE) to log metrics and plots when none is active;
    an already active run is always logged to."""
    wandb_project: str = "histo-dist"
    """W&B project of the run --wandb starts."""
    progress: bool = True
    """Show a progress bar on rank 0."""

    def validate(self) -> list[str]:
        problems = []
        for name in ("checkpoint", "data", "output"):
            if not getattr(self, name):
                problems.append(f"{name}: required")
        try:
            parse_threshold(self.threshold)
        except EvaluationError as e:
            problems.append(f"threshold: {e}")
        for name in ("bootstrap", "num_workers", "error_examples"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.threshold in THRESHOLD_METHODS and self.threshold_split == self.split:
            problems.append(f"threshold_split: the threshold must be chosen on another split than the evaluated "
                            f"one ({self.split!r}), or the test numbers are optimistic")
        return problems


def parse_threshold(text: str | float) -> float | str:
    """A fixed threshold in (0, 1) or a method name."""
    if isinstance(text, str) and text.strip().lower() in THRESHOLD_METHODS:
        return text.strip().lower()
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise EvaluationError(f"{text!r} is neither a number in (0, 1) nor one of {', '.join(THRESHOLD_METHODS)}") from None
    if not 0.0 < value < 1.0:
        raise EvaluationError(f"{value} is outside (0, 1)")
    return value


# ---------------------------------------------------------------------------------------------
# Metrics of one set of predictions (torchmetrics; NLL computed directly, clipped like scikit-learn)


def _binary_curve_counts(probs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, TP, FP) at every distinct probability t, calling p >= t positive."""
    p = probs.double().cpu().numpy()
    y = labels.cpu().numpy().astype(np.int64)
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]
    tp = np.cumsum(y)[last_of_group]
    fp = np.cumsum(1 - y)[last_of_group]
    return p[last_of_group], tp, fp


def choose_threshold(probs: torch.Tensor, labels: torch.Tensor, method: str) -> float:
    """The threshold maximising Youden's J or F1 among the distinct probabilities; ties: the lowest."""
    thresholds, tp, fp = _binary_curve_counts(probs, labels)
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    if positives == 0 or (method == "youden" and negatives == 0):
        missing = "positive" if positives == 0 else "negative"
        raise EvaluationError(f"cannot choose a threshold by {method}: the split has no {missing} samples")
    if method == "youden":
        score = tp / positives - fp / negatives
    elif method == "f1":
        score = 2 * tp / (2 * tp + fp + (positives - tp))
    else:
        raise EvaluationError(f"unknown threshold method {method!r}; use one of {', '.join(THRESHOLD_METHODS)}")
    best = len(score) - 1 - int(np.argmax(score[::-1]))  # thresholds descend: the last maximum is the lowest
    return float(thresholds[best])


def _clipped(probs: torch.Tensor) -> torch.Tensor:
    eps = torch.finfo(probs.dtype).eps
    return probs.clamp(eps, 1 - eps)


def binary_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of P(positive) `probs` (N,) against 0/1 `labels`; thresholded ones call p >= threshold positive."""
    from torchmetrics.functional import classification as F

    probs, labels = probs.double(), labels.long()
    hard = (probs >= threshold).long()  # integer predictions: torchmetrics applies no threshold of its own
    values = {
        "accuracy": F.binary_accuracy(hard, labels),
        "precision": F.binary_precision(hard, labels),
        "recall": F.binary_recall(hard, labels),
        "specificity": F.binary_specificity(hard, labels),
        "f1": F.binary_f1_score(hard, labels),
        "auroc": F.binary_auroc(probs, labels),
        "average_precision": F.binary_average_precision(probs, labels),
        "ece": F.binary_calibration_error(probs, labels, n_bins=ECE_BINS, norm="l1"),
    }
    out: dict[str, Any] = {k: float(v) for k, v in values.items()}
    out["balanced_accuracy"] = (out["recall"] + out["specificity"]) / 2
    p = _clipped(probs)
    out["nll"] = float(-(labels * p.log() + (1 - labels) * (1 - p).log()).mean())
    out["confusion_matrix"] = F.binary_confusion_matrix(hard, labels).tolist()  # rows true, columns predicted
    out["threshold"] = float(threshold)
    out["num_samples"] = int(len(labels))
    return out


def multiclass_metrics(probs: torch.Tensor, labels: torch.Tensor, label_names: list[str] | None = None) -> dict[str, Any]:
    """Metrics of (N, K) class probabilities; the prediction is the most probable class."""
    from torchmetrics.functional import classification as F

    probs, labels = probs.double(), labels.long()
    k = probs.shape[1]
    hard = probs.argmax(1)
    out: dict[str, Any] = {
        "accuracy": float(F.multiclass_accuracy(hard, labels, k, average="micro")),
        "precision": float(F.multiclass_precision(hard, labels, k, average="macro")),
        "recall": float(F.multiclass_recall(hard, labels, k, average="macro")),
        "f1": float(F.multiclass_f1_score(hard, labels, k, average="macro")),
        "auroc": float(F.multiclass_auroc(probs, labels, k, average="macro")),
        "average_precision": float(F.multiclass_average_precision(probs, labels, k, average="macro")),
        "ece": float(F.multiclass_calibration_error(probs, labels, k, n_bins=ECE_BINS, norm="l1")),
    }
    out["balanced_accuracy"] = out["recall"]  # macro recall over classes
    out["nll"] = float(-_clipped(probs).gather(1, labels[:, None]).log().mean())
    out["confusion_matrix"] = F.multiclass_confusion_matrix(hard, labels, k).tolist()
    names = label_names or [str(i) for i in range(k)]
    per_class = {
        "precision": F.multiclass_precision(hard, labels, k, average="none").tolist(),
        "recall": F.multiclass_recall(hard, labels, k, average="none").tolist(),
        "f1": F.multiclass_f1_score(hard, labels, k, average="none").tolist(),
        "auroc": F.multiclass_auroc(probs, labels, k, average="none").tolist(),
    }
    out["per_class"] = {name: {m: float(v[i]) for m, v in per_class.items()} for i, name in enumerate(names)}
    out["threshold"] = None
    out["num_samples"] = int(len(labels))
    return out


def compute_metrics(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None = 0.5,
                    label_names: list[str] | None = None) -> dict[str, Any]:
    if probs.ndim == 1:
        return binary_metrics(probs, labels, 0.5 if threshold is None else threshold)
    return multiclass_metrics(probs, labels, label_names)


def weighted_auroc(scores: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUROC for each row of sample weights (B, N): the weighted probability that a positive scores
    above a negative, ties counting half (the Mann-Whitney form of the area under the ROC curve).
    With weights of 1 it is the usual AUROC; with bootstrap counts, that of the resample."""
    _, group = torch.unique(scores, sorted=True, return_inverse=True)  # tie groups, ascending score
    groups = int(group.max()) + 1 if len(group) else 0
    w_pos = torch.zeros(weights.shape[0], groups, dtype=torch.float64).index_add_(1, group[positive], weights[:, positive])
    w_neg = torch.zeros(weights.shape[0], groups, dtype=torch.float64).index_add_(1, group[~positive], weights[:, ~positive])
    below = torch.cumsum(w_neg, 1) - w_neg  # negative weight strictly below each group
    pairs = w_pos.sum(1) * w_neg.sum(1)
    return (w_pos * (below + 0.5 * w_neg)).sum(1) / pairs


def bootstrap_ci(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None, resamples: int = 1000,
                 seed: int = 0, level: float = CI_LEVEL) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of AUROC (macro one-vs-rest for multi-class) and accuracy:
    `resamples` draws of N samples with replacement from a seeded generator. Draws missing a
    class are skipped for AUROC."""
    probs, labels = probs.double(), labels.long()
    n = len(labels)
    binary = probs.ndim == 1
    hard = (probs >= (0.5 if threshold is None else threshold)).long() if binary else probs.argmax(1)
    correct = (hard == labels).double()
    k = 2 if binary else probs.shape[1]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    accuracies, aurocs = [], []
    chunk = max(1, min(resamples, 2**24 // max(n, 1)))  # ~128 MB of float64 counts at a time
    for start in range(0, resamples, chunk):
        idx = torch.from_numpy(rng.integers(0, n, size=(min(chunk, resamples - start), n)))
        counts = torch.zeros(len(idx), n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64))
        accuracies.append((counts @ correct) / n)
        class_counts = torch.stack([counts[:, labels == c].sum(1) for c in range(k)], 1)
        complete = (class_counts > 0).all(1)
        if binary:
            auc = weighted_auroc(probs, labels == 1, counts)
        else:
            auc = torch.stack([weighted_auroc(probs[:, c], labels == c, counts) for c in range(k)], 1).mean(1)
        aurocs.append(auc[complete])
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def interval(values: list[torch.Tensor]) -> list[float] | None:
        v = torch.cat(values).numpy() if values else np.empty(0)
        return [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) else None

    return {"auroc": interval(aurocs), "accuracy": interval(accuracies)}


# ---------------------------------------------------------------------------------------------
# One pass over a split on every rank


@dataclass
class SplitPredictions:
    keys: list[str]
    labels: torch.Tensor
    probs: torch.Tensor
    probs_tta: torch.Tensor | None
    errors: dict[str, list[dict]] = field(default_factory=dict)
    """Most confident errors per kind: dicts with key, label, probability, score, image (H, W, 3 uint8)."""


class ErrorExamples:
    """The k most confident errors of each kind seen so far (ties broken by key: rank-independent)."""

    def __init__(self, k: int):
        self.k = k
        self.items: dict[str, list[dict]] = {}

    def update(self, kind: str, scores: torch.Tensor, keys: list[str], images: torch.Tensor, labels: torch.Tensor,
               probs: torch.Tensor) -> None:
        current = self.items.setdefault(kind, [])
        if self.k == 0:
            return
        candidates = torch.nonzero(torch.isfinite(scores)).reshape(-1)
        if len(candidates) > self.k:
            candidates = candidates[torch.topk(scores[candidates], self.k).indices]
        for i in candidates.tolist():
            current.append({"key": keys[i], "label": int(labels[i]), "score": float(scores[i]),
                            "probability": probs[i].tolist(), "image": images[i].permute(1, 2, 0).contiguous().numpy()})
        self.items[kind] = self.merge([current], self.k)

    @staticmethod
    def merge(lists: list[list[dict]], k: int) -> list[dict]:
        return sorted((item for items in lists for item in items), key=lambda d: (-d["score"], d["key"]))[:k]


def error_scores(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> dict[str, torch.Tensor]:
    """Per kind of error, a confidence score for each sample that is such an error (-inf otherwise)."""
    inf = torch.tensor(-math.inf, dtype=torch.float64)
    probs = probs.double()
    if probs.ndim == 1:
        predicted = probs >= threshold
        return {
            "false_positive": torch.where((labels == 0) & predicted, probs, inf),  # confident: p high
            "false_negative": torch.where((labels == 1) & ~predicted, 1 - probs, inf),  # confident: p low
        }
    confidence, predicted = probs.max(1)
    return {"misclassified": torch.where(predicted != labels, confidence, inf)}


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


@torch.no_grad()
def predict_split(loaded: LoadedModel, manifest, split: str, cfg: EvalConfig, accelerator,
                  error_threshold: float | None = None, keep_errors: bool = False) -> SplitPredictions:
    """Predictions for every sample of `split`, on every rank, sorted by key. Every rank must call it."""
    from tqdm import tqdm

    from histo_dist.loader import LoaderConfig, ShardLoader

    acc = accelerator
    loader_cfg = LoaderConfig(eval_batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    loader = ShardLoader(manifest, split, loader_cfg, rank=acc.process_index, world_size=acc.num_processes,
                         training=False)
    keys, labels, probs, probs_tta = [], [], [], []
    errors = ErrorExamples(cfg.error_examples)
    where = f"{manifest.root}: split {split!r}"
    bar = tqdm(total=loader.rank_samples * acc.num_processes, desc=f"evaluate {split}", unit="img",
               disable=not (acc.is_main_process and cfg.progress), dynamic_ncols=True)
    for batch in loader:
        images = batch["image"]
        x = model_input(images.to(acc.device, non_blocking=True), loaded, cfg.resize, where)
        with acc.autocast():
            plain, tta = predict_probs(loaded.model, x, loaded.num_classes, cfg.tta, loaded.channels_last)
        plain = plain.float().cpu()
        keys.extend(batch["key"])
        labels.append(batch["label"])
        probs.append(plain)
        if tta is not None:
            probs_tta.append(tta.float().cpu())
        if keep_errors:
            for kind, scores in error_scores(plain, batch["label"], error_threshold).items():
                errors.update(kind, scores, batch["key"], images, batch["label"], plain)
        bar.update(len(batch["key"]) * acc.num_processes)
    bar.close()
    mine = (keys, torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
            torch.cat(probs) if probs else torch.empty(0), torch.cat(probs_tta) if probs_tta else None, errors.items)
    parts = _gather(mine)
    all_keys = [k for p in parts for k in p[0]]
    expected = manifest.split(split).num_samples
    if len(all_keys) != expected:
        raise EvaluationError(f"{where}: the evaluation counted {len(all_keys)} samples across "
                              f"{acc.num_processes} rank(s), the manifest has {expected}")
    if len(set(all_keys)) != len(all_keys):
        raise EvaluationError(f"{where}: some sample keys occur twice; run `histo-dist verify {manifest.root}`")
    order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
    index = torch.tensor(order, dtype=torch.long)
    result = SplitPredictions(
        keys=[all_keys[i] for i in order],
        labels=torch.cat([p[1] for p in parts])[index],
        probs=torch.cat([p[2] for p in parts])[index],
        probs_tta=torch.cat([p[3] for p in parts])[index] if cfg.tta else None,
    )
    if keep_errors:
        kinds = {kind for p in parts for kind in p[4]}
        result.errors = {kind: ErrorExamples.merge([p[4].get(kind, []) for p in parts], cfg.error_examples)
                         for kind in sorted(kinds)}
    return result


# ---------------------------------------------------------------------------------------------
# The whole evaluation


def _threshold_for(spec: float | str, valid: SplitPredictions | None, tta: bool) -> float:
    if isinstance(spec, float):
        return spec
    assert valid is not None
    return choose_threshold(valid.probs_tta if tta else valid.probs, valid.labels, spec)


def _section(pred: torch.Tensor, labels: torch.Tensor, threshold: float | None, spec, cfg: EvalConfig,
             label_names: list[str]) -> dict[str, Any]:
    values = compute_metrics(pred, labels, threshold, label_names)
    if pred.ndim == 1:
        values["threshold_method"] = spec if isinstance(spec, str) else "fixed"
        values["threshold_split"] = cfg.threshold_split if isinstance(spec, str) else None
    if cfg.bootstrap:
        values["ci95"] = bootstrap_ci(pred, labels, threshold, cfg.bootstrap, cfg.seed)
    return values


def evaluate(cfg: EvalConfig, accelerator=None) -> dict[str, Any]:
    """Run the evaluation (every rank calls this). Returns metrics.json's content: complete on the
    main process, which alone computes metrics and writes; the other ranks get the run's details."""
    from histo_dist.config import ConfigError
    from histo_dist.manifest import Manifest

    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "evaluate options")
    spec = parse_threshold(cfg.threshold)
    # Everything that can be checked without the data is, before any process group or pass.
    loaded = load_model(cfg.checkpoint, cfg.weights)
    manifest = Manifest.load(cfg.data)
    manifest.split(cfg.split)  # names the split and the available ones
    check_classes(loaded, manifest.num_classes, manifest.label_names, str(manifest.root / "manifest.json"))
    check_size(loaded, manifest.image_shape[0], manifest.image_shape[1], str(manifest.root / "manifest.json"), cfg.resize)
    if not loaded.binary and spec != 0.5:
        raise EvaluationError(f"--threshold {cfg.threshold}: thresholds apply to binary tasks; this {loaded.num_classes}-class "
                              "model predicts the most probable class")
    if isinstance(spec, str):
        if cfg.threshold_split not in manifest.splits:
            raise EvaluationError(
                f"{manifest.root / 'manifest.json'}: --threshold {spec} chooses the threshold on split "
                f"{cfg.threshold_split!r}, which is not in this dataset (it has {', '.join(manifest.splits)}); "
                "pass --threshold-split NAME or a fixed --threshold"
            )

    own = accelerator is None
    if own:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    acc = accelerator
    try:
        loaded.to(acc.device)
        valid = predict_split(loaded, manifest, cfg.threshold_split, cfg, acc) if isinstance(spec, str) else None
        threshold = _threshold_for(spec, valid, tta=False) if loaded.binary else None
        threshold_tta = _threshold_for(spec, valid, tta=True) if loaded.binary and cfg.tta else None
        test = predict_split(loaded, manifest, cfg.split, cfg, acc, error_threshold=threshold, keep_errors=True)
        names = list(manifest.label_names)
        results: dict[str, Any] = {
            "checkpoint": str(cfg.checkpoint),
            "step": loaded.step,
            "model": loaded.config.model.name,
            "weights": loaded.weights,
            "data": str(manifest.root),
            "split": cfg.split,
            "task": "binary" if loaded.binary else "multiclass",
            "label_names": names,
            "world_size": acc.num_processes,
            "bootstrap": {"resamples": cfg.bootstrap, "seed": cfg.seed, "level": CI_LEVEL, "method": "percentile"},
        }
        if acc.is_main_process:  # metrics only where they are written: bootstrap is not free
            results.update(_section(test.probs, test.labels, threshold, spec, cfg, names))
            if cfg.tta:
                results["tta"] = {"views": TTA_VIEWS, **_section(test.probs_tta, test.labels, threshold_tta, spec, cfg, names)}
            write_outputs(cfg, loaded, results, test)
        acc.wait_for_everyone()
        return results
    finally:
        if own:
            acc.end_training()


# ---------------------------------------------------------------------------------------------
# Outputs (rank 0)


def write_predictions(path: Path, pred: SplitPredictions, results: dict[str, Any], label_names: list[str]) -> None:
    """predictions.csv, one row per sample: binary: key, label, probability (of the positive class),
    predicted (at the threshold); multi-class: key, label, predicted, probability (of the predicted
    class), prob_<class> for each class. With TTA the same columns again with a _tta suffix."""
    binary = pred.probs.ndim == 1
    variants = [("", pred.probs, results.get("threshold"))]
    if pred.probs_tta is not None:
        variants.append(("_tta", pred.probs_tta, results["tta"].get("threshold")))
    header = ["key", "label"]
    for suffix, _, _ in variants:
        header += [f"probability{suffix}", f"predicted{suffix}"] if binary else \
            [f"predicted{suffix}", f"probability{suffix}", *(f"prob_{n}{suffix}" for n in label_names)]
    columns = []
    for _, probs, threshold in variants:
        p = probs.double().numpy()
        if binary:
            columns.append([p, (p >= threshold).astype(int)])
        else:
            columns.append([p.argmax(1), p.max(1), *p.T])
    labels = pred.labels.numpy()
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, key in enumerate(pred.keys):
            row: list[Any] = [key, int(labels[i])]
            for cols in columns:
                row += [repr(float(c[i])) if isinstance(c[i], (float, np.floating)) else int(c[i]) for c in cols]
            w.writerow(row)
    os.replace(tmp, path)


def write_outputs(cfg: EvalConfig, loaded: LoadedModel, results: dict[str, Any], test: SplitPredictions) -> None:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    names = list(results["label_names"])
    write_predictions(out / "predictions.csv", test, results, names)
    images: dict[str, Path] = {}
    if cfg.plots:
        from histo_dist.plots import save_evaluation_plots

        run_dir = Path(cfg.checkpoint).resolve().parent.parent
        images, notes = save_evaluation_plots(out, test.probs, test.labels, names, results, test.probs_tta,
                                              test.errors, run_dir / "metrics.jsonl", title=f"{cfg.split} split")
        results["plots"] = {k: p.name for k, p in images.items()}
        results["plot_notes"] = notes
        for note in notes:
            log.info("%s", note)
    _write_json(out / "metrics.json", results)
    _log_wandb(cfg, results, images)
    _print_summary(results, out)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


SCALARS = ("accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy", "auroc", "average_precision",
           "nll", "ece", "threshold")


def _log_wandb(cfg: EvalConfig, results: dict[str, Any], images: dict[str, Path]) -> None:
    """Log to the active W&B run, or to one started here with --wandb."""
    active = sys.modules.get("wandb")
    run = getattr(active, "run", None) if active is not None else None
    started = False
    if run is None and cfg.wandb:
        import wandb

        run = wandb.init(project=cfg.wandb_project, job_type="evaluate", dir=cfg.output,
                         name=f"eval-{Path(cfg.checkpoint).resolve().parent.parent.name}-{cfg.split}", config=asdict(cfg))
        started = True
    if run is None:
        return
    import wandb

    prefix = f"eval/{cfg.split}"
    values = {f"{prefix}/{k}": results[k] for k in SCALARS if isinstance(results.get(k), (int, float))}
    if "tta" in results:
        values.update({f"{prefix}/tta_{k}": results["tta"][k] for k in SCALARS if isinstance(results["tta"].get(k), (int, float))})
    values.update({f"{prefix}/{name}": wandb.Image(str(path)) for name, path in images.items()})
    run.log(values)
    for k, v in values.items():
        if not isinstance(v, wandb.Image):
            run.summary[k] = v
    if started:
        run.finish()


def _print_summary(results: dict[str, Any], out: Path) -> None:
    def line(name: str, r: dict[str, Any]) -> str:
        ci = r.get("ci95") or {}
        fmt = lambda k: f"{k} {r[k]:.4f}" + (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if ci.get(k) else "")
        thr = f" at threshold {r['threshold']:.4f} ({r['threshold_method']})" if r.get("threshold") is not None else ""
        return f"{name}: {fmt('auroc')}, {fmt('accuracy')}, f1 {r['f1']:.4f}, nll {r['nll']:.4f}, ece {r['ece']:.4f}{thr}"

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

    evaluate(from_namespace(EvalConfig, args, "evaluate options"))
    return 0
