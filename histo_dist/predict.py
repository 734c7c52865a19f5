"""Run a trained checkpoint on new patches and write one CSV row per image.

    histo-dist predict --checkpoint RUN/checkpoints/best.pt --input PATCHES/ --output preds.csv
    histo-dist predict ... --input camelyonpatch_level_2_split_test_x.h5 --tta
    histo-dist predict ... --input SHARDS --split test --threshold EVAL/metrics.json

--input is one of:
- a folder of image files (.png, .jpg, .jpeg, .tif, .tiff, .bmp, .webp, searched recursively;
  key = the path relative to the folder) or a single image file;
- a PCam-layout HDF5 file with dataset `x` (N, H, W, 3 uint8); key = the row index; labels are
  read from the matching `..._y.h5` next to it when there is one;
- a shard folder (manifest.json) written by `histo-dist convert`, with --split; key = sample key.

Images must have the size the model was trained on; another size is an error naming the file,
unless --resize is given (bilinear, antialiased). The CSV has the schema of `histo-dist evaluate`'s
predictions.csv: key, [label,] then for binary models probability (= P(second class), e.g.
P(tumor)), predicted (probability >= threshold) and predicted_name; multi-class models give the
most probable class, its name and probability, and prob_<class> for every class. --tta adds the
same columns with a _tta suffix for the probabilities averaged over the 8 symmetries of the square.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histo_dist.allocator import keep_freed_memory
from histo_dist.errors import HistoDistError
from histo_dist.files import check_input, check_output
from histo_dist.inference import (
    InferenceModel,
    InferenceOptions,
    autocast,
    check_classes,
    check_data,
    check_size,
    load_inference_model,
    resize_uint8,
)

log = logging.getLogger(__name__)


class InputError(HistoDistError):
    """Input for prediction that is missing, empty or not in a readable layout."""


@dataclass
class PredictConfig(InferenceOptions):
    input: str = ""
    """A folder of image files (or one image), a PCam-layout .h5 file (dataset x), or a shard folder (manifest.json)."""
    output: str = ""
    """CSV file to write (one row per image)."""
    split: str = "test"
    """Split to read when --input is a shard folder."""
    tta: bool = False
    """Also give the probabilities averaged over the 8 symmetries of the square (the _tta columns)."""
    threshold: str = "0.5"
    """Binary models: call P(positive) >= threshold positive: a number in (0, 1), or the metrics.json of
    `histo-dist evaluate` to use the thresholds chosen there (its TTA one for the _tta columns)."""

    def validate(self) -> list[str]:
        return InferenceOptions.validate(self) + [
            f"{name}: required" for name in ("input", "output") if not getattr(self, name)
        ]


# ---------------------------------------------------------------------------------------------
# Inputs: each yields (keys, uint8 images (N, 3, H, W), labels or None) batches, already sized


@dataclass
class Batches:
    kind: str
    count: int
    batches: Iterator[tuple[list[str], torch.Tensor, torch.Tensor | None]]


def _sized(images: torch.Tensor, model: InferenceModel, resize: bool, where: str) -> torch.Tensor:
    check_size(model, images.shape[-2], images.shape[-1], where, resize)
    return resize_uint8(images, tuple(model.image_shape[:2]))


def open_input(cfg: PredictConfig, model: InferenceModel) -> Batches:
    path = Path(cfg.input)
    if path.is_dir() and (path / "manifest.json").exists() or path.name == "manifest.json":
        return _shards(path if path.is_dir() else path.parent, cfg, model)
    if path.suffix == ".gz":
        raise InputError(f"{path}: compressed; decompress it first (gunzip -k {path})")
    if path.suffix in (".h5", ".hdf5"):
        return _h5(path, cfg, model)
    return _images(path, cfg, model)


def _images(path: Path, cfg: PredictConfig, model: InferenceModel) -> Batches:
    from histo_dist.sources import IMAGE_SUFFIXES, load_image

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            others = sum(1 for p in path.rglob("*") if p.is_file())
            seen = f" ({others} other file(s))" if others else ""
            raise InputError(
                f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder or below{seen}"
            )
        root = path
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        files, root = [path], path.parent
    else:
        raise InputError(f"{path}: not an image ({', '.join(sorted(IMAGE_SUFFIXES))}), .h5 file or shard folder")

    def batches():
        for start in range(0, len(files), cfg.batch_size):
            chunk = files[start : start + cfg.batch_size]
            images = []
            for f in chunk:
                image = torch.from_numpy(np.array(load_image(str(f)))).permute(2, 0, 1)[None]
                images.append(_sized(image, model, cfg.resize, str(f)))
            yield [str(f.relative_to(root)) for f in chunk], torch.cat(images), None

    return Batches("image files", len(files), batches())


def _h5(path: Path, cfg: PredictConfig, model: InferenceModel) -> Batches:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if "x" not in f:
            raise InputError(
                f"{path}: no dataset 'x' (it has {', '.join(f.keys()) or 'none'}); expected PCam's uint8 (N, H, W, 3)"
            )
        shape, dtype = f["x"].shape, f["x"].dtype
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise InputError(f"{path}: dataset 'x' is {dtype} {shape}, expected uint8 (N, H, W, 3) like PCam")
    if shape[0] == 0:
        raise InputError(f"{path}: dataset 'x' holds no images")
    check_size(model, shape[1], shape[2], str(path), cfg.resize)
    labels_path = path.with_name(path.name.replace("_x.h5", "_y.h5")) if path.name.endswith("_x.h5") else None
    labels = None
    if labels_path is not None and labels_path.exists():
        with h5py.File(labels_path, "r") as fy:
            labels = torch.from_numpy(np.asarray(fy["y"][:]).reshape(-1).astype(np.int64))
        if len(labels) != shape[0]:
            raise InputError(f"{labels_path}: {len(labels)} labels for {shape[0]} images in {path}")

    def batches():
        with h5py.File(path, "r") as fx:
            for start in range(0, shape[0], cfg.batch_size):
                stop = min(start + cfg.batch_size, shape[0])
                images = torch.from_numpy(fx["x"][start:stop]).permute(0, 3, 1, 2)
                yield (
                    [str(i) for i in range(start, stop)],
                    _sized(images, model, cfg.resize, str(path)),
                    None if labels is None else labels[start:stop],
                )

    return Batches("PCam h5 rows", shape[0], batches())


def _shards(root: Path, cfg: PredictConfig, model: InferenceModel) -> Batches:
    from histo_dist.loader import ShardLoader
    from histo_dist.manifest import Manifest

    manifest = Manifest.load(root)
    info = manifest.split(cfg.split)  # names the split and the ones there are
    if info.num_samples == 0:
        raise InputError(f"{root}: split {cfg.split!r} holds no samples")
    check_classes(model, manifest.num_classes, manifest.label_names, str(manifest.root / "manifest.json"))
    check_data(model, manifest.image_shape, str(manifest.root / "manifest.json"), cfg.resize)
    loader = ShardLoader(manifest, cfg.split, cfg.loader_config(), training=False)

    def batches():
        for batch in loader:
            yield batch["key"], _sized(batch["image"], model, cfg.resize, str(root)), batch["label"]

    return Batches(f"samples of split {cfg.split!r}", info.num_samples, batches())


# ---------------------------------------------------------------------------------------------


def read_thresholds(text: str) -> tuple[float, float]:
    """(threshold, TTA threshold): a number for both, or those recorded in an evaluation's metrics.json."""
    from histo_dist.metrics import EvaluationError, parse_threshold

    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"--threshold {path}: not a readable metrics.json ({e})") from None
        if data.get("threshold") is None:
            raise InputError(
                f"--threshold {path}: records no threshold (a multi-class evaluation or not from `histo-dist evaluate`)"
            )
        return float(data["threshold"]), float((data.get("tta") or data)["threshold"])
    try:
        value = parse_threshold(text)
    except EvaluationError as e:
        raise InputError(f"--threshold: {e}") from None
    if isinstance(value, str):
        raise InputError(
            f"--threshold {text}: choosing a threshold needs labelled data; run `histo-dist evaluate "
            f"--threshold {text}` and pass its metrics.json here"
        )
    return value, value


def predict(cfg: PredictConfig) -> str:
    """Write the predictions CSV; returns the summary line."""
    from tqdm import tqdm

    from histo_dist.config import ConfigError
    from histo_dist.evaluation import predict_batches, write_predictions

    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "predict options")
    check_input(cfg.checkpoint, "--checkpoint", "file")
    check_input(cfg.input, "--input")
    out = check_output(cfg.output, "--output", "file")
    model = load_inference_model(cfg.checkpoint, cfg.weights)
    if len(model.image_shape) == 1:
        raise InputError(
            f"--checkpoint {cfg.checkpoint}: a {model.model_name} takes embeddings, and predict reads images; "
            "evaluate it on an embedding dataset with `histo-dist evaluate`"
        )
    threshold, threshold_tta = read_thresholds(cfg.threshold) if model.binary else (None, None)
    source = open_input(cfg, model)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    if device.type == "cpu" and cfg.cpu_keep_freed_memory:
        keep_freed_memory()
    model.to(device)
    with tqdm(total=source.count, desc="predict", unit="img", disable=not cfg.progress, dynamic_ncols=True) as bar:
        predictions = predict_batches(
            model,
            source.batches,
            device=device,
            autocast=autocast(device, cfg.mixed_precision),
            tta=cfg.tta,
            resize=cfg.resize,
            progress=bar.update,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_predictions(out, predictions, list(model.label_names), threshold, threshold_tta)
    summary = f"wrote {len(predictions.keys)} predictions for {source.kind} to {out}"
    if model.binary:
        probs, t = (predictions.probs_tta, threshold_tta) if cfg.tta else (predictions.probs, threshold)
        summary += (
            f" ({int((probs.double() >= t).sum())} predicted {model.label_names[1]} at threshold {t:.4f}"
            f"{', TTA x8' if cfg.tta else ''})"
        )
    return summary


def configure(parser: argparse.ArgumentParser) -> None:
    from histo_dist.config import add_dataclass_arguments

    add_dataclass_arguments(parser, PredictConfig, required=["checkpoint", "input", "output"])


def run(args: argparse.Namespace) -> int:
    from histo_dist.config import from_namespace

    print(predict(from_namespace(PredictConfig, args, "predict options")))
    return 0
