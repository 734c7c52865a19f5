"""Evaluation: our numbers against the metrics' definitions, the threshold chosen on valid and applied to test,
seeded bootstrap intervals, TTA in probability space, 2 ranks = 1 rank, outputs, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from histo_dist.augment import AugmentConfig, dihedral_views
from histo_dist.checkpoint import CheckpointError
from histo_dist.evaluate import EvalConfig, evaluate
from histo_dist.inference import DataMismatchError, InferenceModel
from histo_dist.manifest import ManifestError
from histo_dist.metrics import (
    EvaluationError,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    multiclass_metrics,
    weighted_auroc,
)
from tests.eval_data import is_png, load_json, make_checkpoint, make_multiclass_dataset, read_csv, trained_run

BIN = Path(sys.executable).parent
PLOTS = (
    "learning_curves.png",
    "roc.png",
    "pr.png",
    "confusion_matrix.png",
    "confusion_matrix_tta.png",
    "reliability.png",
    "errors.png",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    return trained_run(tmp_path_factory.getbasetemp())


def eval_cfg(shards: Path, checkpoint: Path, output: Path, **kw) -> EvalConfig:
    base = dict(
        checkpoint=str(checkpoint),
        data=str(shards),
        output=str(output),
        num_workers=0,
        batch_size=32,
        bootstrap=200,
        progress=False,
    )
    return EvalConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------
# Metrics against their definitions, computed here the slow and plain way (pairs of samples for AUROC, every
# distinct threshold for average precision), on the same predictions


def confusion(labels: np.ndarray, hard: np.ndarray, classes: int = 2) -> np.ndarray:
    """[true class, predicted class] -> count."""
    matrix = np.zeros((classes, classes), dtype=int)
    np.add.at(matrix, (labels, hard), 1)
    return matrix


def per_class(labels: np.ndarray, hard: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """Precision, recall and F1 of each class (one against the rest)."""
    matrix = confusion(labels, hard, classes)
    hits = np.diag(matrix)
    precision, recall = hits / matrix.sum(0), hits / matrix.sum(1)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The probability that a positive outscores a negative (ties count half), over weighted pairs."""
    w = np.ones(len(scores)) if weights is None else weights
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    pair_weights = w[positive][:, None] * w[~positive][None, :]
    return float((pair_weights * wins).sum() / pair_weights.sum())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Sum over the distinct thresholds, highest first, of (recall gained) x (precision there)."""
    total, recall_before = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        predicted = scores >= t
        hits = (predicted & positive).sum()
        recall = hits / positive.sum()
        total += (recall - recall_before) * hits / predicted.sum()
        recall_before = recall
    return float(total)


def random_binary(n: int = 600, seed: int = 0, decimals: int | None = 2) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.001, 0.999)
    if decimals is not None:
        probs = np.round(probs, decimals)  # ties, as real models produce
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(labels)


@pytest.mark.parametrize("threshold", [0.5, 0.37])
def test_binary_metrics_equal_their_definitions(threshold):
    probs, labels = random_binary()
    got = binary_metrics(probs, labels, threshold)
    p, y = probs.numpy(), labels.numpy()
    hard = (p >= threshold).astype(int)
    (tn, fp), (fn, tp) = confusion(y, hard)
    assert got["accuracy"] == pytest.approx((tp + tn) / len(y))
    assert got["precision"] == pytest.approx(tp / (tp + fp))
    assert got["recall"] == pytest.approx(tp / (tp + fn))
    assert got["specificity"] == pytest.approx(tn / (tn + fp))
    assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert got["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)
    assert got["auroc"] == pytest.approx(auroc(p, y == 1))
    assert got["average_precision"] == pytest.approx(average_precision(p, y == 1))
    q = np.clip(p, np.finfo(p.dtype).eps, 1 - np.finfo(p.dtype).eps)  # (rounded to 2 decimals: some are 0 or 1)
    assert got["nll"] == pytest.approx(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
    assert got["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert got["threshold"] == threshold and got["num_samples"] == len(y)


def test_expected_calibration_error_is_the_15_bin_reference():
    probs, labels = random_binary(decimals=None)
    p, y = probs.numpy(), labels.numpy()
    bins = np.minimum((p * 15).astype(int), 14)
    reference = sum(
        abs(y[bins == b].mean() - p[bins == b].mean()) * (bins == b).mean() for b in range(15) if (bins == b).any()
    )
    assert binary_metrics(probs, labels)["ece"] == pytest.approx(reference, abs=1e-9)


def test_multiclass_metrics_equal_their_definitions():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 500)
    logits = rng.normal(size=(500, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    got = multiclass_metrics(torch.tensor(probs), torch.tensor(labels), ["a", "b", "c"])
    hard = probs.argmax(1)
    each = per_class(labels, hard, 3)  # macro averages: the mean over classes, each one against the rest
    assert got["accuracy"] == pytest.approx(np.mean(hard == labels))
    assert got["precision"] == pytest.approx(each["precision"].mean())
    assert got["recall"] == got["balanced_accuracy"] == pytest.approx(each["recall"].mean())
    assert got["f1"] == pytest.approx(each["f1"].mean())
    assert got["auroc"] == pytest.approx(np.mean([auroc(probs[:, c], labels == c) for c in range(3)]))
    assert got["average_precision"] == pytest.approx(
        np.mean([average_precision(probs[:, c], labels == c) for c in range(3)])
    )
    assert got["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(500), labels])))
    assert got["confusion_matrix"] == confusion(labels, hard, 3).tolist()
    assert got["per_class"]["b"]["recall"] == pytest.approx(each["recall"][1])


# ---------------------------------------------------------------------------------------------
# Threshold choice and bootstrap


def brute_force_threshold(probs: np.ndarray, labels: np.ndarray, method: str) -> float:
    """Try every distinct probability; keep the best score, the lowest threshold on ties."""
    best, best_t = -np.inf, None
    for t in sorted(set(probs.tolist())):
        (tn, fp), (fn, tp) = confusion(labels, (probs >= t).astype(int))
        score = tp / (tp + fn) - fp / (fp + tn) if method == "youden" else 2 * tp / (2 * tp + fp + fn)
        if score > best + 1e-12:
            best, best_t = score, t
    return best_t


@pytest.mark.parametrize("method", ["youden", "f1"])
@pytest.mark.parametrize("seed", [0, 3])
def test_threshold_choice_equals_brute_force(method, seed):
    probs, labels = random_binary(n=300, seed=seed)
    assert choose_threshold(probs, labels, method) == brute_force_threshold(probs.numpy(), labels.numpy(), method)


def test_threshold_needs_both_classes():
    with pytest.raises(EvaluationError, match="no positive samples"):
        choose_threshold(torch.rand(10), torch.zeros(10, dtype=torch.long), "youden")


def test_resample_auroc_equals_the_definition_with_sample_weights():
    probs, labels = random_binary(n=300, seed=5)  # with ties
    counts = torch.from_numpy(np.random.default_rng(0).integers(0, 4, size=(3, 300))).double()
    counts[0] = 1
    got = weighted_auroc(probs, labels == 1, counts)
    for row, value in zip(counts, got):
        assert float(value) == pytest.approx(auroc(probs.numpy(), labels.numpy() == 1, row.numpy()))


def test_bootstrap_intervals_are_seeded_and_contain_the_estimate():
    probs, labels = random_binary(n=400)
    a = bootstrap_ci(probs, labels, 0.5, resamples=300, seed=7)
    assert a == bootstrap_ci(probs, labels, 0.5, resamples=300, seed=7)
    assert a != bootstrap_ci(probs, labels, 0.5, resamples=300, seed=8)
    point = binary_metrics(probs, labels, 0.5)
    for name in ("auroc", "accuracy"):
        lo, hi = a[name]
        assert lo < point[name] < hi, name
        assert hi - lo < 0.2


# ---------------------------------------------------------------------------------------------
# Test-time augmentation


class Invariant(torch.nn.Module):
    """Logit from the image mean: the same for every rotation and flip."""

    def forward(self, x):
        return x.mean((1, 2, 3))[:, None] * 3


class TopLeft(torch.nn.Module):
    """Logit from the top-left pixel: each symmetry moves another corner there."""

    def forward(self, x):
        return x[:, 0, 0, 0][:, None] * 2


def predict_probs(model: torch.nn.Module, x: torch.Tensor, num_classes: int, tta: bool):
    wrapped = InferenceModel(
        model, num_classes, tuple(map(str, range(num_classes))), (8, 8, 3), AugmentConfig(), False, "test"
    )
    return wrapped.probabilities(x, tta)


def test_tta_views_are_the_8_distinct_symmetries():
    x = torch.randn(1, 3, 5, 5)
    views = list(dihedral_views(x))
    assert len(views) == 8 and torch.equal(views[0], x)
    assert len({v.numpy().tobytes() for v in views}) == 8


def test_tta_with_an_invariant_model_changes_nothing():
    x = torch.randn(6, 3, 8, 8)
    plain, tta = predict_probs(Invariant(), x, 2, tta=True)
    torch.testing.assert_close(tta, plain, rtol=0, atol=1e-6)


def test_tta_averages_probabilities_not_logits():
    x = torch.randn(6, 3, 8, 8)
    plain, tta = predict_probs(TopLeft(), x, 2, tta=True)
    corners = torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0], x[:, 0, -1, -1]], 1) * 2
    torch.testing.assert_close(plain, torch.sigmoid(x[:, 0, 0, 0] * 2))
    torch.testing.assert_close(tta, torch.sigmoid(corners).mean(1))  # each corner is seen by 2 of the 8 views
    assert not torch.allclose(tta, torch.sigmoid(corners.mean(1)), atol=1e-4)

    # Multi-class: softmax per view, then the mean.
    def logits(v):
        return torch.stack([v[:, 0, 0, 0], v[:, 1, 0, 0], v[:, 2, 0, 0]], 1)

    model = type("M", (torch.nn.Module,), {"forward": lambda self, v: logits(v)})()
    _, tta3 = predict_probs(model, x, 3, tta=True)
    expected = torch.stack([torch.softmax(logits(v), 1) for v in dihedral_views(x)]).mean(0)
    torch.testing.assert_close(tta3, expected)


# ---------------------------------------------------------------------------------------------
# End to end on a trained checkpoint


@pytest.fixture(scope="module")
def evaluation(run, tmp_path_factory) -> tuple[Path, dict]:
    shards, run_dir = run
    out = tmp_path_factory.mktemp("eval") / "youden-tta"
    results = evaluate(eval_cfg(shards, run_dir / "checkpoints/best.pt", out, threshold="youden", tta=True))
    return out, results


def test_evaluation_writes_metrics_predictions_and_every_plot(evaluation, run):
    out, results = evaluation
    metrics = load_json(out / "metrics.json")
    for name in (
        "accuracy",
        "precision",
        "recall",
        "f1",
        "auroc",
        "average_precision",
        "balanced_accuracy",
        "nll",
        "ece",
        "confusion_matrix",
        "threshold",
        "ci95",
    ):
        assert name in metrics and name in metrics["tta"], name
    assert (
        metrics["num_samples"] == 100
        and metrics["threshold_method"] == "youden"
        and metrics["threshold_split"] == "valid"
    )
    assert 0.7 < metrics["auroc"] < 0.99  # the tiny model learned the centre square, not the label noise
    for name in ("auroc", "accuracy"):
        lo, hi = metrics["ci95"][name]
        assert lo <= metrics[name] <= hi
    for name in PLOTS:
        assert is_png(out / name), name
    rows = read_csv(out / "predictions.csv")
    assert [r["key"] for r in rows] == [f"test_{i:09d}" for i in range(100)]  # one row per sample, sorted
    assert list(rows[0]) == [
        "key",
        "label",
        "probability",
        "predicted",
        "predicted_name",
        "probability_tta",
        "predicted_tta",
        "predicted_name_tta",
    ]
    # The numbers in metrics.json are those of the predictions in the CSV (recomputed here).
    y = np.array([int(r["label"]) for r in rows])
    for suffix, section in (("", metrics), ("_tta", metrics["tta"])):
        p = np.array([float(r[f"probability{suffix}"]) for r in rows])
        assert section["auroc"] == pytest.approx(auroc(p, y == 1), abs=1e-6)
        assert section["accuracy"] == pytest.approx(np.mean(y == (p >= section["threshold"])))
        assert [int(r[f"predicted{suffix}"]) for r in rows] == (p >= section["threshold"]).astype(int).tolist()


def test_the_runs_test_evaluation_is_what_evaluate_reports_for_its_best_checkpoint(run, tmp_path):
    """One evaluation path: the trainer's test of the best checkpoint (RUN/test/, threshold chosen on
    valid by default) and `histo-dist evaluate` with the same options write the same files."""
    shards, run_dir = run
    cfg = eval_cfg(
        shards, run_dir / "checkpoints/best.pt", tmp_path / "out", threshold="youden", bootstrap=1000, batch_size=100
    )
    results = evaluate(cfg)
    assert load_json(run_dir / "test/metrics.json") == load_json(tmp_path / "out/metrics.json") == results
    assert (
        results["threshold_method"] == "youden"
        and results["step"] == torch.load(run_dir / "checkpoints/best.pt", weights_only=True)["step"]
    )
    assert (run_dir / "test/predictions.csv").read_bytes() == (tmp_path / "out/predictions.csv").read_bytes()


def test_threshold_is_chosen_on_valid_and_applied_unchanged_to_test(evaluation, run, tmp_path):
    out, results = evaluation
    shards, run_dir = run
    valid = evaluate(
        eval_cfg(shards, run_dir / "checkpoints/best.pt", tmp_path, split="valid", tta=True, bootstrap=0, plots=False)
    )
    assert valid["num_samples"] == 73
    rows = read_csv(tmp_path / "predictions.csv")
    y = np.array([int(r["label"]) for r in rows])
    for suffix, section in (("", results), ("_tta", results["tta"])):
        p = np.array([float(r[f"probability{suffix}"]) for r in rows])
        assert section["threshold"] == pytest.approx(brute_force_threshold(p, y, "youden"), abs=1e-7)


def test_learning_curves_need_the_runs_metrics_jsonl(run, tmp_path):
    shards, _ = run
    checkpoint = make_checkpoint(tmp_path / "elsewhere/best.pt", label_names=["negative", "positive"])
    results = evaluate(eval_cfg(shards, checkpoint, tmp_path / "out", bootstrap=0))
    assert not (tmp_path / "out/learning_curves.png").exists()
    assert any("learning curves skipped" in note for note in results["plot_notes"])
    assert is_png(tmp_path / "out/roc.png")


@pytest.mark.parametrize("keep", [True, False])
def test_evaluate_on_the_cpu_keeps_freed_memory_unless_told_not_to(tmp_path, monkeypatch, keep):
    import histo_dist.evaluate as evaluate_module

    calls = []
    monkeypatch.setattr(evaluate_module, "keep_freed_memory", lambda: calls.append("mallopt") or True)
    shards = tmp_path / "shards"
    make_multiclass_dataset(shards, {"valid": [10], "test": [10]})
    checkpoint = make_checkpoint(tmp_path / "best.pt", num_classes=3)
    evaluate(
        eval_cfg(shards, checkpoint, tmp_path / "out", cpu=True, bootstrap=0, plots=False, cpu_keep_freed_memory=keep)
    )
    assert calls == (["mallopt"] if keep else [])


def test_multiclass_evaluation_writes_per_class_probabilities(tmp_path):
    shards = tmp_path / "shards"
    make_multiclass_dataset(shards, {"valid": [30], "test": [25, 20]})
    checkpoint = make_checkpoint(tmp_path / "run/checkpoints/best.pt", num_classes=3)
    results = evaluate(eval_cfg(shards, checkpoint, tmp_path / "out", tta=True, bootstrap=50))
    assert results["task"] == "multiclass" and results["threshold"] is None and results["num_samples"] == 45
    for name in ("auroc", "accuracy"):
        lo, hi = results["ci95"][name]
        assert lo <= results[name] <= hi, name
    rows = read_csv(tmp_path / "out/predictions.csv")
    assert len(rows) == 45
    for row in rows:
        probs = [float(row[f"prob_class{c}"]) for c in range(3)]
        assert sum(probs) == pytest.approx(1, abs=1e-5)
        assert int(row["predicted"]) == int(np.argmax(probs)) and float(row["probability"]) == max(probs)
    for name in PLOTS[1:]:
        assert is_png(tmp_path / "out" / name), name
    with pytest.raises(EvaluationError, match="binary"):
        evaluate(eval_cfg(shards, checkpoint, tmp_path / "out2", threshold="youden"))


@pytest.mark.slow
def test_two_ranks_equal_one_rank(evaluation, run, tmp_path):
    out1, one = evaluation
    shards, run_dir = run
    out2 = tmp_path / "two"
    cmd = [  # the `accelerate` command itself, as the README gives it (other tests start its launcher module)
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "-m",
        "histo_dist",
        "evaluate",
        "--checkpoint",
        str(run_dir / "checkpoints/best.pt"),
        "--data",
        str(shards),
        "--output",
        str(out2),
        "--threshold",
        "youden",
        "--tta",
        "--bootstrap",
        "200",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = load_json(out2 / "metrics.json")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["num_samples"] == one["num_samples"] == 100  # each sample once across ranks
    for section_two, section_one in ((two, one), (two["tta"], one["tta"])):
        for name in (
            "threshold",
            "accuracy",
            "precision",
            "recall",
            "f1",
            "auroc",
            "average_precision",
            "balanced_accuracy",
            "nll",
            "ece",
        ):
            assert section_two[name] == pytest.approx(section_one[name], abs=1e-6), name
        assert section_two["confusion_matrix"] == section_one["confusion_matrix"]
        for name in ("auroc", "accuracy"):
            assert section_two["ci95"][name] == pytest.approx(section_one["ci95"][name], abs=1e-6), name
    rows1, rows2 = read_csv(out1 / "predictions.csv"), read_csv(out2 / "predictions.csv")
    assert [r["key"] for r in rows1] == [r["key"] for r in rows2]
    for col in ("probability", "probability_tta"):
        np.testing.assert_allclose([float(r[col]) for r in rows2], [float(r[col]) for r in rows1], atol=1e-6)
    for name in PLOTS:
        assert is_png(out2 / name), name


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors that name what is wrong


def test_missing_split_names_it_and_the_available_ones(run, tmp_path):
    shards, run_dir = run
    with pytest.raises(ManifestError, match=r"'holdout' not in this dataset; it has train, valid, test"):
        evaluate(eval_cfg(shards, run_dir / "checkpoints/best.pt", tmp_path, split="holdout"))
    with pytest.raises(EvaluationError, match=r"split 'tune'.*it has train, valid, test"):
        evaluate(eval_cfg(shards, run_dir / "checkpoints/best.pt", tmp_path, threshold="f1", threshold_split="tune"))


def test_checkpoint_for_another_number_of_classes_is_refused(run, tmp_path):
    shards, _ = run
    checkpoint = make_checkpoint(tmp_path / "three.pt", num_classes=3)
    with pytest.raises(DataMismatchError, match=r"three.pt was trained for 3 classes.*has 2 \(negative, positive\)"):
        evaluate(eval_cfg(shards, checkpoint, tmp_path / "out"))


def test_weights_of_another_architecture_are_refused(run, tmp_path):
    shards, run_dir = run
    state = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)
    state["config"]["model"]["name"] = "resnet18"  # the config no longer describes the weights
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"edited.pt: its model weights do not fit model.name=resnet18"):
        evaluate(eval_cfg(shards, tmp_path / "edited.pt", tmp_path / "out"))
    torch.save({"weights": state["model"]}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"plain.pt: not a histo-dist training checkpoint"):
        evaluate(eval_cfg(shards, tmp_path / "plain.pt", tmp_path / "out"))


def test_other_image_size_needs_resize(tmp_path):
    shards = tmp_path / "shards"
    make_multiclass_dataset(shards, {"test": [12]}, num_classes=2, shape=(40, 40, 3))
    checkpoint = make_checkpoint(tmp_path / "run/checkpoints/best.pt", num_classes=2)
    with pytest.raises(DataMismatchError, match=r"images are 40x40 pixels.*trained on 32x32.*--resize"):
        evaluate(eval_cfg(shards, checkpoint, tmp_path / "out", bootstrap=0))
    results = evaluate(eval_cfg(shards, checkpoint, tmp_path / "out", bootstrap=0, resize=True, plots=False))
    assert results["num_samples"] == 12


def test_cli_prints_the_error_and_exits_2(run, tmp_path, capsys):
    from histo_dist.cli import main

    shards, run_dir = run
    code = main(
        ["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(shards), "--output", str(tmp_path)]
    )
    assert code == 2
    assert f"--checkpoint {tmp_path / 'nope.pt'}: no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# compare


def test_compare_prints_evaluations_side_by_side(evaluation, run, tmp_path, capsys):
    from histo_dist.cli import main

    out, results = evaluation
    shards, run_dir = run
    assert main(["compare", str(out), str(run_dir)]) == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert "youden-tta" in header and "youden-tta +TTA" in header and "eval-run" in header
    auroc_row = next(line for line in text.splitlines() if line.startswith("auroc"))
    assert f"{results['auroc']:.4f} [{results['ci95']['auroc'][0]:.3f}" in auroc_row
    assert main(["compare", str(tmp_path)]) == 2
    assert "holds neither metrics.json" in capsys.readouterr().err
