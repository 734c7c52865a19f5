"""Every evaluation histo-dist makes: a model over a split on N ranks, each sample exactly once.

One path, three users:

- the trainer's periodic validation: `validate_split` (metrics at threshold 0.5 on every rank; the
  threshold-free ones, AUROC by default, pick the best checkpoint);
- the trainer's test of the best checkpoint and `histo-dist evaluate`: `evaluate_split` (threshold
  chosen on the validation split, TTA, bootstrap intervals, `metrics.json`, `predictions.csv` and
  plots in one folder), so a run's `test/metrics.json` is what `histo-dist evaluate` reports for
  the same checkpoint and options;
- `histo-dist predict`: `predict_batches` and `write_predictions` on images from anywhere.

Every rank reads its own contiguous part of the split (`loader.split_loader`: streamed images or
embeddings held in memory, no padding duplicates); the predictions of all ranks are gathered onto
every rank, sorted by key, and checked against the manifest's sample count. Functions that gather
are collectives: every rank calls them with the same arguments. Only the main process writes.

A folder holds one evaluation, replaced as one set: the new files are written whole (atomically)
into a hidden staging folder beside the old ones, then moved into place, the old set's `metrics.json`
removed first and the new one moved in last. A `metrics.json` always describes the files beside it;
an evaluation killed while it computes or writes leaves the earlier set as it was.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from histo_dist.files import write_atomic
from histo_dist.metrics import (
    CI_LEVEL,
    SCALARS,
    EvaluationError,
    bootstrap_ci,
    choose_threshold,
    compute_metrics,
    parse_threshold,
)

log = logging.getLogger(__name__)

TTA_VIEWS = 8
OUTPUT_FILES = (
    "metrics.json",
    "predictions.csv",
    "learning_curves.png",
    "roc.png",
    "pr.png",
    "confusion_matrix.png",
    "confusion_matrix_tta.png",
    "reliability.png",
    "errors.png",
)
"""What an evaluation folder holds (metrics.json is written last: the mark of a complete set)."""
STAGING = ".evaluation-*.partial"
"""The hidden folders where a new set is written before it replaces the old one."""


@dataclass
class EvalOptions:
    threshold: float | str = 0.5
    """Binary tasks: decision threshold on P(positive): a number in (0, 1), or 'youden' / 'f1' to choose it on the
    validation split (Youden's J or best F1) and apply it unchanged to the evaluated split."""
    tta: bool = False
    """Also report test-time augmentation: probabilities averaged over the 8 symmetries of the square."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% confidence intervals of AUROC and accuracy (0: none)."""
    seed: int = 0
    """Seed of the bootstrap resampling (same seed, same intervals)."""
    error_examples: int = 8
    """How many of the most confident false positives and false negatives (or errors, multi-class) to show."""
    plots: bool = True
    """Write the PNG plots (learning curves, ROC, PR, confusion matrix, reliability diagram, errors)."""

    def validate(self) -> list[str]:
        problems = []
        try:
            parse_threshold(self.threshold)
        except EvaluationError as e:
            problems.append(f"threshold: {e}")
        for name in ("bootstrap", "error_examples"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:  # numpy's seed sequences take non-negative 64-bit seeds
            problems.append(f"seed: must be in [0, 2**63), got {self.seed}")
        return problems

    @property
    def threshold_method(self) -> str | None:
        """'youden' or 'f1' when the threshold is chosen on another split, else None."""
        try:
            spec = parse_threshold(self.threshold)
        except EvaluationError:
            return None
        return spec if isinstance(spec, str) else None


# ---------------------------------------------------------------------------------------------
# Predictions


@dataclass
class SplitPredictions:
    keys: list[str]
    labels: torch.Tensor | None
    """(N,) int64, or None for unlabelled images (`histo-dist predict`)."""
    probs: torch.Tensor
    """(N,) P(positive) for binary models, (N, K) class probabilities otherwise; float32."""
    probs_tta: torch.Tensor | None = None
    """The same averaged over the 8 symmetries, when TTA was asked for."""
    errors: dict[str, list[dict]] = field(default_factory=dict)
    """Most confident errors per kind: dicts with key, label, probability, score, image (H, W, 3 uint8)."""
    skipped: int = 0
    """Corrupt samples skipped over (loader.skip_corrupt), all ranks."""


class ErrorExamples:
    """The k most confident errors of each kind seen so far (ties broken by key: rank-independent)."""

    def __init__(self, k: int):
        self.k = k
        self.items: dict[str, list[dict]] = {}

    def update(
        self, probs: torch.Tensor, labels: torch.Tensor, threshold: float | None, keys: list[str], images: torch.Tensor
    ) -> None:
        for kind, scores in error_scores(probs, labels, threshold).items():
            current = self.items.setdefault(kind, [])
            if self.k == 0:
                continue
            candidates = torch.nonzero(torch.isfinite(scores)).reshape(-1)
            if len(candidates) > self.k:
                candidates = candidates[torch.topk(scores[candidates], self.k).indices]
            for i in candidates.tolist():
                current.append(
                    {
                        "key": keys[i],
                        "label": int(labels[i]),
                        "score": float(scores[i]),
                        "probability": probs[i].tolist(),
                        "image": images[i].permute(1, 2, 0).contiguous().numpy(),
                    }
                )
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


Batches = Iterable[tuple[list[str], torch.Tensor, "torch.Tensor | None"]]
"""(keys, uint8 images (N, 3, H, W), labels or None) per batch."""


@torch.no_grad()
def predict_batches(
    model,
    batches: Batches,
    *,
    device: torch.device | str,
    autocast: Callable[[], contextlib.AbstractContextManager],
    tta: bool = False,
    resize: bool = False,
    where: str = "input",
    error_examples: int = 0,
    error_threshold: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> SplitPredictions:
    """Probabilities for every image of `batches` with `model` (an `inference.InferenceModel`), in the order
    read. With `error_examples`, the most confident errors at `error_threshold` are kept with their images."""
    keys, labels, probs, probs_tta = [], [], [], []
    errors = ErrorExamples(error_examples)
    for batch_keys, images, batch_labels in batches:
        x = model.inputs(images.to(device, non_blocking=True), resize, where)
        with autocast():
            plain, averaged = model.probabilities(x, tta)
        plain = plain.float().cpu()
        keys.extend(batch_keys)
        probs.append(plain)
        if averaged is not None:
            probs_tta.append(averaged.float().cpu())
        if batch_labels is not None:
            labels.append(batch_labels)
            if error_examples:
                errors.update(plain, batch_labels, error_threshold, batch_keys, images.cpu())
        if progress is not None:
            progress(len(batch_keys))
    empty = torch.empty((0,) if model.binary else (0, model.num_classes))
    return SplitPredictions(
        keys=keys,
        labels=torch.cat(labels) if labels else (torch.empty(0, dtype=torch.long) if not keys else None),
        probs=torch.cat(probs) if probs else empty,
        probs_tta=(torch.cat(probs_tta) if probs_tta else empty) if tta else None,
        errors=errors.items,
    )


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` on every rank (objects: the parts differ in size from rank to rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def predict_split(
    model,
    manifest,
    split: str,
    loader_cfg,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    tta: bool = False,
    resize: bool = False,
    error_examples: int = 0,
    error_threshold: float | None = None,
    show_progress: bool = False,
) -> SplitPredictions:
    """Predictions for every sample of `split`, gathered on every rank and sorted by key. A collective:
    every rank calls it. Each rank reads its own part; the total is checked against the manifest."""
    from tqdm import tqdm

    from histo_dist.loader import split_loader

    loader = split_loader(
        manifest,
        split,
        loader_cfg,
        rank=rank,
        world_size=world_size,
        training=False,
        device_type=torch.device(device).type,
    )
    where = f"{manifest.root}: split {split!r}"
    skipped = 0

    def batches():
        nonlocal skipped
        for batch in loader:
            skipped += batch["skipped"]
            if len(batch["key"]):
                yield batch["key"], batch["image"], batch["label"]

    with tqdm(
        total=loader.rank_samples * world_size,
        desc=f"evaluate {split}",
        unit="img",
        leave=False,
        disable=not (rank == 0 and show_progress),
        dynamic_ncols=True,
    ) as bar:
        mine = predict_batches(
            model,
            batches(),
            device=device,
            autocast=autocast,
            tta=tta,
            resize=resize,
            where=where,
            error_examples=0 if manifest.embeddings else error_examples,  # the grid of errors shows images
            error_threshold=error_threshold,
            progress=lambda n: bar.update(n * world_size),
        )
    mine.skipped = skipped
    parts = gather_objects(mine)
    keys = [k for p in parts for k in p.keys]
    skipped = sum(p.skipped for p in parts)
    expected = manifest.split(split).num_samples
    if len(keys) + skipped != expected:
        raise EvaluationError(
            f"{where}: the evaluation counted {len(keys)} samples across {world_size} rank(s)"
            + (f" and skipped {skipped} as corrupt" if skipped else "")
            + f", the manifest has {expected}"
        )
    if len(set(keys)) != len(keys):
        raise EvaluationError(f"{where}: some sample keys occur twice; run `histo-dist verify {manifest.root}`")
    if skipped:
        log.warning("evaluation of %r: %d corrupt sample(s) skipped (loader.skip_corrupt)", split, skipped)
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)
    kinds = sorted({kind for p in parts for kind in p.errors})
    return SplitPredictions(
        keys=[keys[i] for i in order.tolist()],
        labels=torch.cat([p.labels for p in parts])[order],
        probs=torch.cat([p.probs for p in parts])[order],
        probs_tta=torch.cat([p.probs_tta for p in parts])[order] if tta else None,
        errors={kind: ErrorExamples.merge([p.errors.get(kind, []) for p in parts], error_examples) for kind in kinds},
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------
# Validation during training and full evaluations


def validate_split(model, manifest, split: str, loader_cfg, **where) -> dict[str, Any]:
    """Metrics of `split` at threshold 0.5, the same on every rank (a collective). `where`: rank,
    world_size, device, autocast (as for `predict_split`)."""
    pred = predict_split(model, manifest, split, loader_cfg, **where)
    values = compute_metrics(pred.probs, pred.labels, 0.5, list(manifest.label_names))
    values["skipped_samples"] = pred.skipped
    return values


def evaluate_split(
    model,
    manifest,
    split: str,
    opts: EvalOptions,
    loader_cfg,
    *,
    threshold_split: str,
    rank: int,
    world_size: int,
    device: torch.device | str,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    resize: bool = False,
    info: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> tuple[dict[str, Any], SplitPredictions]:
    """The full evaluation of `split` (a collective): (results, predictions). The threshold is fixed or
    chosen on `threshold_split` (with TTA, the TTA threshold on TTA probabilities). Results, as in
    metrics.json: `info`, then the metrics at that threshold with bootstrap intervals, and a "tta"
    section with --tta. Metrics are computed on the main process only (bootstrap is not free); the
    other ranks get `info` alone."""
    spec = parse_threshold(opts.threshold)
    binary = model.binary
    if not binary and spec != 0.5:
        raise EvaluationError(
            f"threshold {opts.threshold}: thresholds apply to binary tasks; this {model.num_classes}-class "
            "model predicts the most probable class"
        )
    where = dict(
        rank=rank, world_size=world_size, device=device, autocast=autocast, resize=resize, show_progress=show_progress
    )
    threshold = threshold_tta = None
    if binary:
        threshold = threshold_tta = spec if isinstance(spec, float) else None
        if isinstance(spec, str):
            if threshold_split == split:
                raise EvaluationError(
                    f"the threshold must be chosen on another split than the evaluated one ({split!r}), "
                    "or the numbers are optimistic"
                )
            valid = predict_split(model, manifest, threshold_split, loader_cfg, tta=opts.tta, **where)
            threshold = choose_threshold(valid.probs, valid.labels, spec)
            threshold_tta = choose_threshold(valid.probs_tta, valid.labels, spec) if opts.tta else None
    pred = predict_split(
        model,
        manifest,
        split,
        loader_cfg,
        tta=opts.tta,
        error_examples=opts.error_examples,
        error_threshold=threshold,
        **where,
    )
    names = list(manifest.label_names)
    results: dict[str, Any] = {
        **(info or {}),
        "split": split,
        "task": "binary" if binary else "multiclass",
        "label_names": names,
        "world_size": world_size,
        "bootstrap": {"resamples": opts.bootstrap, "seed": opts.seed, "level": CI_LEVEL, "method": "percentile"},
    }
    if pred.skipped:
        results["skipped_samples"] = pred.skipped
    if rank == 0:
        threshold_info = (
            {
                "threshold_method": spec if isinstance(spec, str) else "fixed",
                "threshold_split": threshold_split if isinstance(spec, str) else None,
            }
            if binary
            else {}
        )
        results.update(_section(pred.probs, pred.labels, threshold, names, opts), **threshold_info)
        if opts.tta:
            results["tta"] = {
                "views": TTA_VIEWS,
                **_section(pred.probs_tta, pred.labels, threshold_tta, names, opts),
                **threshold_info,
            }
    return results, pred


def _section(
    probs: torch.Tensor, labels: torch.Tensor, threshold: float | None, names: list[str], opts: EvalOptions
) -> dict[str, Any]:
    values = compute_metrics(probs, labels, threshold, names)
    if opts.bootstrap:
        values["ci95"] = bootstrap_ci(probs, labels, threshold, opts.bootstrap, opts.seed)
    return values


def scalars(results: dict[str, Any]) -> dict[str, float]:
    """The single numbers of an evaluation (TTA ones prefixed tta_): what goes to W&B and metrics.jsonl."""
    out = {k: results[k] for k in SCALARS if isinstance(results.get(k), (int, float))}
    tta = results.get("tta") or {}
    out.update({f"tta_{k}": tta[k] for k in SCALARS if isinstance(tta.get(k), (int, float))})
    if "skipped_samples" in results:
        out["skipped_samples"] = results["skipped_samples"]
    return out


# ---------------------------------------------------------------------------------------------
# Outputs (main process)


def write_predictions(
    path: Path,
    pred: SplitPredictions,
    label_names: list[str],
    threshold: float | None,
    threshold_tta: float | None = None,
) -> None:
    """predictions.csv, one row per sample, the same schema for `evaluate` and `predict`: key, label (when
    known), then binary: probability (of the positive class), predicted (at the threshold), predicted_name;
    multi-class: predicted, predicted_name, probability (of the predicted class), prob_<class> per class.
    With TTA the same columns again with a _tta suffix."""
    binary = pred.probs.ndim == 1
    variants = [("", pred.probs, threshold)]
    if pred.probs_tta is not None:
        variants.append(("_tta", pred.probs_tta, threshold_tta))
    header = ["key"] + (["label"] if pred.labels is not None else [])
    columns = []
    for suffix, probs, t in variants:
        p = probs.double()
        if binary:
            predicted = (p >= t).long()
            header += [f"probability{suffix}", f"predicted{suffix}", f"predicted_name{suffix}"]
            columns.append([p.tolist(), predicted.tolist(), [label_names[i] for i in predicted.tolist()]])
        else:
            confidence, predicted = p.max(1)
            header += [
                f"predicted{suffix}",
                f"predicted_name{suffix}",
                f"probability{suffix}",
                *(f"prob_{n}{suffix}" for n in label_names),
            ]
            columns.append(
                [predicted.tolist(), [label_names[i] for i in predicted.tolist()], confidence.tolist(), *p.T.tolist()]
            )
    rows = (
        [pred.keys]
        + ([pred.labels.tolist()] if pred.labels is not None else [])
        + [c for cols in columns for c in cols]
    )
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(zip(*[[repr(v) if isinstance(v, float) else v for v in column] for column in rows]))
    write_atomic(path, text.getvalue())


def write_evaluation(
    folder: Path,
    results: dict[str, Any],
    pred: SplitPredictions,
    *,
    plots: bool = True,
    metrics_jsonl: Path | None = None,
) -> dict[str, Path]:
    """One evaluation's files in `folder` (predictions.csv, the plots, metrics.json), replacing an earlier
    evaluation's files there as one set. Returns {plot name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(STAGING):  # of a killed evaluation
        shutil.rmtree(leftover, ignore_errors=True)
    stage = folder / STAGING.replace("*", uuid.uuid4().hex[:12])
    stage.mkdir()
    try:
        images = _write_set(stage, results, pred, plots, metrics_jsonl)
        (folder / "metrics.json").unlink(missing_ok=True)  # from here on the folder holds no complete set
        for name in (n for n in OUTPUT_FILES if n != "metrics.json"):
            if (stage / name).exists():
                os.replace(stage / name, folder / name)
            else:  # the earlier set's, not part of this one
                (folder / name).unlink(missing_ok=True)
        os.replace(stage / "metrics.json", folder / "metrics.json")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {name: folder / path.name for name, path in images.items()}


def _write_set(
    folder: Path, results: dict[str, Any], pred: SplitPredictions, plots: bool, metrics_jsonl: Path | None
) -> dict[str, Path]:
    names = list(results["label_names"])
    tta = results.get("tta") or {}
    write_predictions(folder / "predictions.csv", pred, names, results.get("threshold"), tta.get("threshold"))
    images: dict[str, Path] = {}
    if plots:
        from histo_dist.plots import save_evaluation_plots

        images, notes = save_evaluation_plots(
            folder,
            pred.probs,
            pred.labels,
            names,
            results,
            pred.probs_tta,
            pred.errors,
            metrics_jsonl,
            title=f"{results['split']} split",
        )
        results["plots"] = {k: p.name for k, p in images.items()}
        results["plot_notes"] = notes
        for note in notes:
            log.info("%s", note)
    write_atomic(folder / "metrics.json", json.dumps(results, indent=2) + "\n")
    return images
