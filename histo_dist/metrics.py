"""Classification metrics with torchmetrics: state per rank, reduced across ranks on `compute()`.

`compute()` is a collective when torch.distributed is initialised: every rank must call it (if
only rank 0 does, training hangs). Evaluation therefore runs on every rank; only rank 0 logs.
AUROC is exact because the evaluation loader reads every sample once, with no padding duplicates.

Binary tasks use one logit (probability = sigmoid); multi-class tasks one logit per class.
"""

from __future__ import annotations

import torch
import torchmetrics
from torchmetrics import classification as C

METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "auroc", "balanced_accuracy", "nll")
LOWER_IS_BETTER = {"nll", "loss"}


class EvalMetrics:
    """Accumulates predictions of one evaluation pass; `compute()` returns plain floats."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.binary = num_classes == 2
        if self.binary:
            self.collection = torchmetrics.MetricCollection({
                "accuracy": C.BinaryAccuracy(),
                "precision": C.BinaryPrecision(),
                "recall": C.BinaryRecall(),
                "specificity": C.BinarySpecificity(),
                "f1": C.BinaryF1Score(),
                "auroc": C.BinaryAUROC(),
            })
        else:
            self.collection = torchmetrics.MetricCollection({
                "accuracy": C.MulticlassAccuracy(num_classes, average="micro"),
                "precision": C.MulticlassPrecision(num_classes, average="macro"),
                "recall": C.MulticlassRecall(num_classes, average="macro"),
                "f1": C.MulticlassF1Score(num_classes, average="macro"),
                "auroc": C.MulticlassAUROC(num_classes, average="macro"),
                "balanced_accuracy": C.MulticlassRecall(num_classes, average="macro"),
            })
        self.nll = torchmetrics.SumMetric()
        self.count = torchmetrics.SumMetric()
        self.to(device)

    def to(self, device) -> "EvalMetrics":
        self.collection.to(device)
        self.nll.to(device)
        self.count.to(device)
        return self

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        if self.binary:
            logits = logits.reshape(-1)
            nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
            self.collection.update(torch.sigmoid(logits), labels)
        else:
            nll = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            self.collection.update(torch.softmax(logits, dim=1), labels)
        self.nll.update(nll)
        self.count.update(torch.tensor(float(labels.numel()), device=logits.device))

    def compute(self) -> dict[str, float]:
        """Every rank must call this (collective). Returns the metrics over all ranks' samples."""
        values = {k: float(v) for k, v in self.collection.compute().items()}
        count = float(self.count.compute())
        if self.binary:
            values["balanced_accuracy"] = (values["recall"] + values.pop("specificity")) / 2
        values["nll"] = float(self.nll.compute()) / max(count, 1.0)
        values["num_samples"] = count
        return values

    def reset(self) -> None:
        self.collection.reset()
        self.nll.reset()
        self.count.reset()


def is_better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best
