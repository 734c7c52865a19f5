"""Pictures of an evaluation, as PNG files that read well without the code (titles, axes, legends)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from histo_dist.files import atomic_path


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# Evaluation plots. Every figure says what it shows: title with the split
# and sample count, labelled axes with units, and the metric in the legend.

PLAIN_STYLE = {"color": "tab:blue", "lw": 2}
TTA_STYLE = {"color": "tab:orange", "lw": 2, "ls": "--"}


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _ci_text(section: dict, metric: str) -> str:
    ci = (section.get("ci95") or {}).get(metric)
    return f", 95% CI {ci[0]:.3f}-{ci[1]:.3f}" if ci else ""


def _variants(probs, probs_tta, metrics: dict) -> list[tuple[str, torch.Tensor, dict, dict]]:
    out = [("no TTA", probs, metrics, PLAIN_STYLE)]
    if probs_tta is not None and "tta" in metrics:
        out.append(("TTA x8", probs_tta, metrics["tta"], TTA_STYLE))
    return out


def _threshold_text(metrics: dict) -> str:
    method = metrics.get("threshold_method")
    origin = (
        f", {'Youden' if method == 'youden' else 'best F1'} on {metrics.get('threshold_split')}"
        if method in ("youden", "f1")
        else ""
    )
    return f"threshold {metrics['threshold']:.2f} (no TTA{origin})"


def _operating_point(probs: torch.Tensor, labels: torch.Tensor, threshold: float) -> tuple[float, float, float]:
    """(false positive rate, true positive rate, precision) when p >= threshold is called positive."""
    predicted = probs >= threshold
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    tp = int((predicted & (labels == 1)).sum())
    fp = int((predicted & (labels == 0)).sum())
    return fp / max(negatives, 1), tp / max(positives, 1), tp / max(tp + fp, 1)


def _wilson(fraction, n, z: float = 1.96):
    """95% Wilson score interval of observed fractions over n trials (numpy arrays)."""
    import numpy as np

    n = np.asarray(n, dtype=float)
    centre = (fraction + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(fraction * (1 - fraction) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


DISPLAY = {"auroc": "AUROC", "nll": "NLL", "f1": "F1", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy"}


def learning_curves_plot(metrics_jsonl: Path, path: Path) -> Path | None:
    """Train and validation loss and accuracy per epoch from a run's metrics.jsonl (None if it has no epochs).

    Train loss is the mean of the losses logged during the epoch; validation values are those of the
    epoch's last validation. The epoch whose validation gave the best checkpoint is marked."""
    import json

    records = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train: dict[int, list[dict]] = {}
    valid: dict[int, dict] = {}
    for r in records:
        if "epoch" not in r:
            continue
        if r.get("kind") == "train":
            train.setdefault(int(r["epoch"]), []).append(r)
        elif r.get("kind") == "valid":
            valid[int(r["epoch"])] = r
    if not train and not valid:
        return None
    plt = _figure()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    te = sorted(train)
    ve = sorted(valid)
    if te:
        ax_loss.plot(
            [e + 1 for e in te],
            [sum(r["loss"] for r in train[e]) / len(train[e]) for e in te],
            "o-",
            color="tab:blue",
            label="train loss (mean over the epoch)",
        )
    if ve and all("nll" in valid[e] for e in ve):
        ax_loss.plot(
            [e + 1 for e in ve], [valid[e]["nll"] for e in ve], "s-", color="tab:red", label="validation loss (NLL)"
        )
    train_acc = [e for e in te if all("accuracy" in r for r in train[e])]
    if train_acc:
        ax_acc.plot(
            [e + 1 for e in train_acc],
            [sum(r["accuracy"] for r in train[e]) / len(train[e]) for e in train_acc],
            "o-",
            color="tab:blue",
            label="train accuracy",
        )
    if ve and all("accuracy" in valid[e] for e in ve):
        ax_acc.plot(
            [e + 1 for e in ve], [valid[e]["accuracy"] for e in ve], "s-", color="tab:red", label="validation accuracy"
        )
    if ve and all("auroc" in valid[e] for e in ve):
        ax_acc.plot(
            [e + 1 for e in ve], [valid[e]["auroc"] for e in ve], "^--", color="tab:purple", label="validation AUROC"
        )
    # The best checkpoint: the validation whose metric equals the running best that was logged with it.
    best_keys = [k for k in (valid[ve[-1]] if ve else {}) if k.startswith("best_")]
    if best_keys:
        metric = best_keys[0][len("best_") :]
        best_epoch = next((e for e in ve if valid[e].get(metric) == valid[ve[-1]][best_keys[0]]), None)
        if best_epoch is not None:
            for ax in (ax_loss, ax_acc):
                ax.axvline(
                    best_epoch + 1,
                    color="grey",
                    ls=":",
                    lw=1.5,
                    label=f"best checkpoint (validation {DISPLAY.get(metric, metric)} {valid[best_epoch][metric]:.3f})",
                )
    if not train_acc:
        ax_acc.text(
            0.02,
            0.02,
            "train accuracy is not logged by the trainer",
            transform=ax_acc.transAxes,
            fontsize=8,
            color="grey",
            va="bottom",
        )
    epochs = sorted(set(te) | set(ve))
    for ax, title, ylabel in (
        (ax_loss, "Loss per epoch", "loss (cross-entropy)"),
        (ax_acc, "Accuracy per epoch", "accuracy / AUROC"),
    ):
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.set_xticks([e + 1 for e in epochs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    ax_acc.set_ylim(min(0.45, ax_acc.get_ylim()[0]), 1.0)
    fig.suptitle(f"Learning curves: {Path(metrics_jsonl).parent.name}", fontsize=11)
    return _save(plt, fig, path)


def roc_curves_plot(
    probs: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    metrics: dict,
    path: Path,
    probs_tta: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """ROC curve(s): binary with and without TTA and the operating point; multi-class one-vs-rest per class."""
    from torchmetrics.functional.classification import binary_roc

    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.6, 5.4))
    if probs.ndim == 1:
        for name, p, section, style in _variants(probs, probs_tta, metrics):
            fpr, tpr, _ = binary_roc(p.double(), labels.long())
            ax.plot(
                fpr.numpy(),
                tpr.numpy(),
                **style,
                label=f"{name}: AUROC {section['auroc']:.3f}{_ci_text(section, 'auroc')}",
            )
        x, y, _ = _operating_point(probs.double(), labels, metrics["threshold"])
        ax.plot(
            [x],
            [y],
            "o",
            color="black",
            ms=7,
            zorder=5,
            label=f"{_threshold_text(metrics)}: sensitivity {y:.2f}, specificity {1 - x:.2f}",
        )
        positive = label_names[1]
    else:
        for c, name in enumerate(label_names):
            fpr, tpr, _ = binary_roc(probs[:, c].double(), (labels == c).long())
            auc = metrics.get("per_class", {}).get(name, {}).get("auroc")
            ax.plot(
                fpr.numpy(),
                tpr.numpy(),
                lw=1.8,
                label=f"{name} vs rest" + (f": AUROC {auc:.3f}" if auc is not None else ""),
            )
        positive = "each class"
        ax.plot([], [], " ", label=f"macro average: AUROC {metrics['auroc']:.3f}{_ci_text(metrics, 'auroc')}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance (AUROC 0.5)")
    ax.set(
        xlabel="false positive rate (1 - specificity)",
        ylabel=f"true positive rate (sensitivity for {positive})",
        title=f"ROC curve, {title} ({len(labels)} patches)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5)
    return _save(plt, fig, path)


def pr_curves_plot(
    probs: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    metrics: dict,
    path: Path,
    probs_tta: torch.Tensor | None = None,
    title: str = "",
) -> Path:
    """Precision-recall curve(s) with average precision in the legend and the prevalence as the chance level."""
    from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve

    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.6, 5.4))
    if probs.ndim == 1:
        for name, p, section, style in _variants(probs, probs_tta, metrics):
            precision, recall, _ = binary_precision_recall_curve(p.double(), labels.long())
            ax.step(
                recall.numpy(),
                precision.numpy(),
                where="post",
                **style,
                label=f"{name}: average precision {section['average_precision']:.3f}",
            )
        _, rec, prec = _operating_point(probs.double(), labels, metrics["threshold"])
        ax.plot(
            [rec],
            [prec],
            "o",
            color="black",
            ms=7,
            zorder=5,
            label=f"{_threshold_text(metrics)}: recall {rec:.2f}, precision {prec:.2f}",
        )
        prevalence = float((labels == 1).double().mean())
        ax.axhline(prevalence, ls=":", color="grey", label=f"chance (prevalence of {label_names[1]} {prevalence:.2f})")
        ylabel, xlabel = f"precision (positive predictive value, {label_names[1]})", "recall (sensitivity)"
    else:
        for c, name in enumerate(label_names):
            target = (labels == c).long()
            precision, recall, _ = binary_precision_recall_curve(probs[:, c].double(), target)
            ap = float(binary_average_precision(probs[:, c].double(), target))
            ax.step(recall.numpy(), precision.numpy(), where="post", lw=1.8, label=f"{name} vs rest: AP {ap:.3f}")
        ax.plot([], [], " ", label=f"macro average: AP {metrics['average_precision']:.3f}")
        ylabel, xlabel = "precision", "recall"
    ax.set(
        xlabel=xlabel,
        ylabel=ylabel,
        title=f"Precision-recall curve, {title} ({len(labels)} patches)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left" if probs.ndim == 1 else "lower right", fontsize=7.5)
    return _save(plt, fig, path)


def reliability_plot(
    probs: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    metrics: dict,
    path: Path,
    probs_tta: torch.Tensor | None = None,
    title: str = "",
    bins: int = 15,
) -> Path:
    """Reliability diagram: observed frequency against mean predicted probability in equal-width bins
    (the bins of the reported ECE), with the number of patches per bin below."""
    import numpy as np

    plt = _figure()
    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5.6, 6.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = np.linspace(0, 1, bins + 1)
    binary = probs.ndim == 1
    for name, p, section, style in _variants(probs, probs_tta, metrics):
        p = p.double()
        if binary:
            confidence, outcome = p.numpy(), (labels == 1).double().numpy()
        else:
            conf, predicted = p.max(1)
            confidence, outcome = conf.numpy(), (predicted == labels).double().numpy()
        index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
        counts = np.bincount(index, minlength=bins)
        filled = counts > 0
        mean_conf = np.bincount(index, confidence, minlength=bins)[filled] / counts[filled]
        observed = np.bincount(index, outcome, minlength=bins)[filled] / counts[filled]
        lo, hi = _wilson(observed, counts[filled])
        ax.errorbar(
            mean_conf,
            observed,
            yerr=[np.maximum(observed - lo, 0), np.maximum(hi - observed, 0)],
            marker="o",
            color=style["color"],
            ls=style.get("ls", "-"),
            lw=1.8,
            ms=5,
            elinewidth=1,
            capsize=2,
            alpha=0.9,
            label=f"{name}: ECE {section['ece']:.3f}",
        )
        centers = (edges[:-1] + edges[1:]) / 2
        width = (1 / bins) * (0.45 if probs_tta is not None else 0.9)
        shift = 0 if probs_tta is None else (-width / 2 if name == "no TTA" else width / 2)
        ax_hist.bar(centers + shift, counts, width=width, color=style["color"], alpha=0.7, label=name)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    ax.text(
        0.98,
        0.02,
        "bars: 95% Wilson interval of each bin",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=7.5,
        color="dimgrey",
    )
    what = f"P({label_names[1]})" if binary else "confidence (probability of the predicted class)"
    ax.set(
        ylabel=f"observed fraction of {label_names[1]}" if binary else "observed accuracy",
        title=f"Reliability diagram, {title} ({len(labels)} patches, {bins} bins)",
        xlim=(0, 1),
        ylim=(-0.01, 1.01),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax_hist.set(xlabel=f"predicted {what}", ylabel="patches per bin")
    ax_hist.grid(alpha=0.3)
    if probs_tta is not None:
        ax_hist.legend(fontsize=7)
    return _save(plt, fig, path)


def confusion_matrix_plot(matrix, label_names: Sequence[str], path: Path, title: str) -> Path:
    """A confusion matrix (rows true, columns predicted) with counts and row percentages."""
    import numpy as np

    plt = _figure()
    matrix = np.asarray(matrix)
    n = len(label_names)
    fig, ax = plt.subplots(figsize=(1.5 * n + 3, 1.4 * n + 2.2))
    rows = matrix.sum(axis=1, keepdims=True).clip(min=1)
    share = matrix / rows
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    cell_names = [["true negatives", "false positives"], ["false negatives", "true positives"]] if n == 2 else None
    for i in range(n):
        for j in range(n):
            color = "white" if share[i, j] > 0.5 else "black"
            name = f"{cell_names[i][j]}\n" if cell_names else ""
            ax.text(
                j,
                i,
                f"{name}{matrix[i, j]}\n{100 * share[i, j]:.1f}% of row",
                ha="center",
                va="center",
                color=color,
                fontsize=9,
            )
    ax.set_xticks(range(n), label_names, rotation=30 if n > 3 else 0)
    ax.set_yticks(range(n), label_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    return _save(plt, fig, path)


def error_grid_plot(
    errors: dict[str, list[dict]], label_names: Sequence[str], path: Path, title: str, columns: int = 8
) -> Path:
    """Tiles of the most confident errors, one row per kind, each with its probability and key."""
    order = {"false_positive": 0, "false_negative": 1, "misclassified": 2}
    rows = sorted(errors.items(), key=lambda kv: order.get(kv[0], 3))
    row_titles = {
        "false_positive": f"False positives: true {label_names[0]}, predicted {label_names[-1]} (most confident first)",
        "false_negative": f"False negatives: true {label_names[-1]}, predicted {label_names[0]} (most confident first)",
        "misclassified": "Misclassified: true -> predicted class (most confident first)",
    }
    plt = _figure()
    ncols = max(columns, 1)
    tile, row_h, top, bottom = 1.45, 2.1, 0.7, 0.1  # inches
    fig_w, fig_h = tile * ncols + 0.4, row_h * len(rows) + top + bottom
    fig, axes = plt.subplots(len(rows), ncols, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(
        left=0.2 / fig_w,
        right=1 - 0.2 / fig_w,
        top=1 - top / fig_h,
        bottom=bottom / fig_h + 0.25 / fig_h,
        wspace=0.12,
        hspace=(row_h - tile) / tile,
    )
    for r, (kind, items) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(items):
                if c == 0:
                    ax.text(
                        0.5, 0.5, "none", ha="center", va="center", fontsize=10, color="grey", transform=ax.transAxes
                    )
                continue
            item = items[c]
            ax.imshow(item["image"], interpolation="nearest")
            prob = item["probability"]
            if isinstance(prob, list):  # multi-class: true -> predicted and the predicted class's probability
                predicted = max(range(len(prob)), key=prob.__getitem__)
                caption = f"{label_names[item['label']]} -> {label_names[predicted]}\np = {prob[predicted]:.3f}"
            else:
                caption = f"P({label_names[-1]}) = {prob:.3f}"
            ax.set_title(caption, fontsize=8)
            ax.text(0.5, -0.03, item["key"], transform=ax.transAxes, ha="center", va="top", fontsize=6, color="dimgrey")
        caption_lines = 2 if any(isinstance(item["probability"], list) for item in items) else 1
        pos = axes[r][0].get_position()
        fig.text(
            pos.x0,
            pos.y1 + (0.2 * caption_lines + 0.12) / fig_h,
            row_titles.get(kind, kind),
            fontsize=9.5,
            fontweight="bold",
            va="bottom",
        )
    fig.suptitle(title, fontsize=11, y=1 - 0.12 / fig_h, va="top")
    with atomic_path(path) as tmp:  # (no tight_layout: the tiles are placed by hand)
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def save_evaluation_plots(
    folder: Path,
    probs: torch.Tensor,
    labels: torch.Tensor,
    label_names: Sequence[str],
    metrics: dict,
    probs_tta: torch.Tensor | None,
    errors: dict[str, list[dict]],
    metrics_jsonl: Path | None,
    title: str = "test split",
) -> tuple[dict[str, Path], list[str]]:
    """Every plot of an evaluation into `folder`; returns ({name: path}, notes about plots left out)."""
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    notes: list[str] = []
    if metrics_jsonl is not None and Path(metrics_jsonl).exists():
        curve = learning_curves_plot(Path(metrics_jsonl), folder / "learning_curves.png")
        if curve is None:
            notes.append(f"learning curves skipped: {metrics_jsonl} has no epoch records")
        else:
            images["learning_curves"] = curve
    else:
        notes.append(f"learning curves skipped: no metrics.jsonl next to the checkpoint's run ({metrics_jsonl})")
    images["roc"] = roc_curves_plot(probs, labels, label_names, metrics, folder / "roc.png", probs_tta, title)
    images["pr"] = pr_curves_plot(probs, labels, label_names, metrics, folder / "pr.png", probs_tta, title)
    threshold = f", threshold {metrics['threshold']:.2f}" if metrics.get("threshold") is not None else ""
    images["confusion_matrix"] = confusion_matrix_plot(
        metrics["confusion_matrix"],
        label_names,
        folder / "confusion_matrix.png",
        f"Confusion matrix, {title}\n({len(labels)} patches{threshold}, accuracy {metrics['accuracy']:.3f})",
    )
    if probs_tta is not None and "tta" in metrics:
        t = metrics["tta"]
        threshold = f", threshold {t['threshold']:.2f}" if t.get("threshold") is not None else ""
        images["confusion_matrix_tta"] = confusion_matrix_plot(
            t["confusion_matrix"],
            label_names,
            folder / "confusion_matrix_tta.png",
            f"Confusion matrix with TTA x8, {title}\n({len(labels)} patches{threshold}, accuracy {t['accuracy']:.3f})",
        )
    images["reliability"] = reliability_plot(
        probs, labels, label_names, metrics, folder / "reliability.png", probs_tta, title
    )
    if errors:
        threshold = f" at threshold {metrics['threshold']:.2f}" if metrics.get("threshold") is not None else ""
        images["errors"] = error_grid_plot(
            errors, label_names, folder / "errors.png", f"Most confident errors, {title}{threshold} (no TTA)"
        )
    return images, notes
