"""Metrics of predictions, as plain functions of tensors (torchmetrics' functional API).

Every evaluation of histo-dist computes its numbers here, from the probabilities of the whole split
(gathered from every rank by `evaluation.py`, each sample once): the trainer's validation, its test
of the best checkpoint, and `histo-dist evaluate`. So the same predictions always give the same
numbers, whichever command produced them.

Binary tasks: probabilities of the positive class (N,); a sample is called positive when
p >= threshold (scikit-learn's convention). The threshold is fixed, or chosen on another split by
Youden's J or the best F1 (`choose_threshold`). Multi-class tasks: (N, K) probabilities, the
prediction is the most probable class; precision, recall, F1, AUROC and average precision are macro
averages. NLL is computed from the probabilities clipped to [eps, 1 - eps], as scikit-learn's log loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from histo_dist.errors import HistoDistError

THRESHOLD_METHODS = ("youden", "f1")
ECE_BINS = 15
CI_LEVEL = 0.95
METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "auroc", "average_precision", "balanced_accuracy", "nll")
LOWER_IS_BETTER = {"nll"}
SCALARS = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "balanced_accuracy",
    "auroc",
    "average_precision",
    "nll",
    "ece",
    "threshold",
)
"""The single numbers of a metrics section (what goes to W&B and learning curves)."""


class EvaluationError(HistoDistError):
    """An evaluation that cannot be done as asked (a split, a threshold, a sample count)."""


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def parse_threshold(text: str | float) -> float | str:
    """A fixed threshold in (0, 1) or a method name."""
    if isinstance(text, str) and text.strip().lower() in THRESHOLD_METHODS:
        return text.strip().lower()
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise EvaluationError(
            f"{text!r} is neither a number in (0, 1) nor one of {', '.join(THRESHOLD_METHODS)}"
        ) from None
    if not 0.0 < value < 1.0:
        raise EvaluationError(f"{value} is outside (0, 1)")
    return value


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


def multiclass_metrics(
    probs: torch.Tensor, labels: torch.Tensor, label_names: list[str] | None = None
) -> dict[str, Any]:
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


def compute_metrics(
    probs: torch.Tensor, labels: torch.Tensor, threshold: float | None = 0.5, label_names: list[str] | None = None
) -> dict[str, Any]:
    if probs.ndim == 1:
        return binary_metrics(probs, labels, 0.5 if threshold is None else threshold)
    return multiclass_metrics(probs, labels, label_names)


def weighted_auroc(scores: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUROC for each row of sample weights (B, N): the weighted probability that a positive scores
    above a negative, ties counting half (the Mann-Whitney form of the area under the ROC curve).
    With weights of 1 it is the usual AUROC; with bootstrap counts, that of the resample."""
    _, group = torch.unique(scores, sorted=True, return_inverse=True)  # tie groups, ascending score
    groups = int(group.max()) + 1 if len(group) else 0
    w_pos = torch.zeros(weights.shape[0], groups, dtype=torch.float64).index_add_(
        1, group[positive], weights[:, positive]
    )
    w_neg = torch.zeros(weights.shape[0], groups, dtype=torch.float64).index_add_(
        1, group[~positive], weights[:, ~positive]
    )
    below = torch.cumsum(w_neg, 1) - w_neg  # negative weight strictly below each group
    pairs = w_pos.sum(1) * w_neg.sum(1)
    return (w_pos * (below + 0.5 * w_neg)).sum(1) / pairs


def bootstrap_ci(
    probs: torch.Tensor,
    labels: torch.Tensor,
    threshold: float | None,
    resamples: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> dict[str, list[float] | None]:
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
        counts = torch.zeros(len(idx), n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(idx.shape, dtype=torch.float64)
        )
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
