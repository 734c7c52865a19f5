"""Pictures of an evaluation, as PNG files that read well without the code (titles, axes, legends)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    return plt


def roc_plot(probs: torch.Tensor, labels: torch.Tensor, path: Path, auroc: float | None = None) -> Path:
    """ROC curve of a binary classifier (probs = P(positive))."""
    from torchmetrics.functional.classification import binary_roc

    plt = _figure()
    fpr, tpr, _ = binary_roc(probs.float(), labels.long())
    fig, ax = plt.subplots(figsize=(5, 5))
    label = f"model (AUROC {auroc:.3f})" if auroc is not None else "model"
    ax.plot(fpr.numpy(), tpr.numpy(), lw=2, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           title=f"ROC curve ({len(labels)} patches)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def confusion_plot(probs: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str], path: Path,
                   threshold: float = 0.5) -> Path:
    """Confusion matrix with counts and row percentages."""
    from torchmetrics.functional.classification import binary_confusion_matrix, multiclass_confusion_matrix

    plt = _figure()
    if probs.ndim == 1:
        matrix = binary_confusion_matrix(probs.float(), labels.long(), threshold=threshold)
    else:
        matrix = multiclass_confusion_matrix(probs.float(), labels.long(), num_classes=probs.shape[1])
    matrix = matrix.numpy()
    n = len(label_names)
    fig, ax = plt.subplots(figsize=(1.6 * n + 2.5, 1.6 * n + 2))
    ax.imshow(matrix, cmap="Blues")
    rows = matrix.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > matrix.max() / 2 else "black"
            ax.text(j, i, f"{matrix[i, j]}\n{100 * matrix[i, j] / rows[i, 0]:.1f}%", ha="center", va="center", color=color)
    ax.set_xticks(range(n), label_names)
    ax.set_yticks(range(n), label_names)
    subtitle = f", threshold {threshold:.2f}" if probs.ndim == 1 else ""
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({len(labels)} patches{subtitle})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_test_plots(probs: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str], folder: Path,
                    metrics: dict) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    images = {"test/confusion_matrix": confusion_plot(probs, labels, label_names, folder / "test_confusion_matrix.png")}
    if probs.ndim == 1:
        images["test/roc"] = roc_plot(probs, labels, folder / "test_roc.png", metrics.get("auroc"))
    return images
