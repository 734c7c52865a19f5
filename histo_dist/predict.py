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
unless --resize is given (bilinear, antialiased). The CSV has columns key, [label,] probability,
predicted, predicted_name for binary models (probability = P(second class), e.g. P(tumor),
predicted = probability >= threshold); multi-class models give the most probable class, its
probability, and prob_<class> for every class. --tta averages the probabilities over the 8
symmetries of the square.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch

from histo_dist.errors import HistoDistError
from histo_dist.inference import LoadedModel, check_classes, check_size, load_model, model_input, predict_probs, resize_uint8

log = logging.getLogger(__name__)


class InputError(HistoDistError):
    """Input for prediction that is missing, empty or not in a readable layout."""


@dataclass
class PredictConfig:
    checkpoint: str = ""
    """Checkpoint file, e.g. RUN/checkpoints/best.pt."""
    input: str = ""
    """A folder of image files (or one image), a PCam-layout .h5 file (dataset x), or a shard folder (manifest.json)."""
    output: str = ""
    """CSV file to write (one row per image)."""
    split: str = "test"
    """Split to read when --input is a shard folder."""
    batch_size: int = 256
    """Images per forward pass."""
    resize: bool = False
    """Resize images of another size than the model was trained on (bilinear, antialiased); without it they are an error."""
    tta: bool = False
    """Average the probabilities over the 8 symmetries of the square (flips x 90-degree rotations)."""
    threshold: str = "0.5"
    """Binary models: call P(positive) >= threshold positive: a number in (0, 1), or the metrics.json of
    `histo-dist evaluate` to use the threshold chosen there (its TTA threshold with --tta)."""
    weights: Literal["auto", "model", "ema"] = "auto"
    """Which weights of the checkpoint: 'auto' takes the EMA average when the run kept one, else the model's."""
    num_workers: int = 1
    """Loader worker processes for shard input."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> list[str]:
        problems = [f"{name}: required" for name in ("checkpoint", "input", "output") if not getattr(self, name)]
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        return problems


# ---------------------------------------------------------------------------------------------
# Inputs: each yields (keys, uint8 images (N, 3, H, W), labels or None) batches, already sized


@dataclass
class Batches:
    kind: str
    count: int
    has_labels: bool
    batches: Iterator[tuple[list[str], torch.Tensor, torch.Tensor | None]]


def _sized(images: torch.Tensor, loaded: LoadedModel, resize: bool, where: str) -> torch.Tensor:
    check_size(loaded, images.shape[-2], images.shape[-1], where, resize)
    return resize_uint8(images, tuple(loaded.image_shape[:2]))


def open_input(cfg: PredictConfig, loaded: LoadedModel) -> Batches:
    path = Path(cfg.input)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir() and (path / "manifest.json").exists() or path.name == "manifest.json":
        return _shards(path if path.is_dir() else path.parent, cfg, loaded)
    if path.suffix == ".gz":
        raise InputError(f"{path}: compressed; decompress it first (gunzip -k {path})")
    if path.suffix in (".h5", ".hdf5"):
        return _h5(path, cfg, loaded)
    return _images(path, cfg, loaded)


def _images(path: Path, cfg: PredictConfig, loaded: LoadedModel) -> Batches:
    from histo_dist.sources import IMAGE_SUFFIXES, load_image

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            others = sum(1 for p in path.rglob("*") if p.is_file())
            seen = f" ({others} other file(s))" if others else ""
            raise InputError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder or below{seen}")
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
                images.append(_sized(image, loaded, cfg.resize, str(f)))
            yield [str(f.relative_to(root)) for f in chunk], torch.cat(images), None

    return Batches("image files", len(files), False, batches())


def _h5(path: Path, cfg: PredictConfig, loaded: LoadedModel) -> Batches:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if "x" not in f:
            raise InputError(f"{path}: no dataset 'x' (it has {', '.join(f.keys()) or 'none'}); expected PCam's uint8 (N, H, W, 3)")
        shape, dtype = f["x"].shape, f["x"].dtype
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise InputError(f"{path}: dataset 'x' is {dtype} {shape}, expected uint8 (N, H, W, 3) like PCam")
    if shape[0] == 0:
        raise InputError(f"{path}: dataset 'x' holds no images")
    check_size(loaded, shape[1], shape[2], str(path), cfg.resize)
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
                yield ([str(i) for i in range(start, stop)], _sized(images, loaded, cfg.resize, str(path)),
                       None if labels is None else labels[start:stop])

    return Batches("PCam h5 rows", shape[0], labels is not None, batches())


def _shards(root: Path, cfg: PredictConfig, loaded: LoadedModel) -> Batches:
    from histo_dist.loader import LoaderConfig, ShardLoader
    from histo_dist.manifest import Manifest

    manifest = Manifest.load(root)
    info = manifest.split(cfg.split)  # names the split and the ones there are
    if info.num_samples == 0:
        raise InputError(f"{root}: split {cfg.split!r} holds no samples")
    check_classes(loaded, manifest.num_classes, manifest.label_names, str(manifest.root / "manifest.json"))
    check_size(loaded, manifest.image_shape[0], manifest.image_shape[1], str(manifest.root / "manifest.json"), cfg.resize)
    loader = ShardLoader(manifest, cfg.split, LoaderConfig(eval_batch_size=cfg.batch_size, num_workers=cfg.num_workers),
                         training=False)

    def batches():
        for batch in loader:
            yield batch["key"], _sized(batch["image"], loaded, cfg.resize, str(root)), batch["label"]

    return Batches(f"samples of split {cfg.split!r}", info.num_samples, True, batches())


# ---------------------------------------------------------------------------------------------


def read_threshold(text: str, tta: bool) -> float:
    """A number, or the threshold recorded in an evaluation's metrics.json."""
    from histo_dist.evaluate import EvaluationError, parse_threshold

    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"--threshold {path}: not a readable metrics.json ({e})") from None
        section = data.get("tta", {}) if tta and "tta" in data else data
        if section.get("threshold") is None:
            raise InputError(f"--threshold {path}: records no threshold (a multi-class evaluation or not from `histo-dist evaluate`)")
        return float(section["threshold"])
    try:
        value = parse_threshold(text)
    except EvaluationError as e:
        raise InputError(f"--threshold: {e}") from None
    if isinstance(value, str):
        raise InputError(f"--threshold {text}: choosing a threshold needs labelled data; run `histo-dist evaluate "
                         f"--threshold {text}` and pass its metrics.json here")
    return value


@torch.no_grad()
def predict(cfg: PredictConfig) -> Path:
    from tqdm import tqdm

    from histo_dist.config import ConfigError

    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "predict options")
    loaded = load_model(cfg.checkpoint, cfg.weights)
    threshold = read_threshold(cfg.threshold, cfg.tta) if loaded.binary else None
    source = open_input(cfg, loaded)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    loaded.to(device)
    names = list(loaded.label_names)
    rows: list[list] = []
    with tqdm(total=source.count, desc="predict", unit="img", disable=not cfg.progress, dynamic_ncols=True) as bar:
        for keys, images, labels in source.batches:
            x = model_input(images.to(device), loaded, cfg.resize)
            plain, tta = predict_probs(loaded.model, x, loaded.num_classes, cfg.tta, loaded.channels_last)
            probs = (tta if cfg.tta else plain).double().cpu().numpy()
            for i, key in enumerate(keys):
                row: list = [key] + ([int(labels[i])] if source.has_labels else [])
                if loaded.binary:
                    predicted = int(probs[i] >= threshold)
                    row += [repr(float(probs[i])), predicted, names[predicted]]
                else:
                    predicted = int(probs[i].argmax())
                    row += [predicted, names[predicted], repr(float(probs[i][predicted])), *(repr(float(p)) for p in probs[i])]
                rows.append(row)
            bar.update(len(keys))
    header = ["key"] + (["label"] if source.has_labels else [])
    header += ["probability", "predicted", "predicted_name"] if loaded.binary else \
        ["predicted", "predicted_name", "probability", *(f"prob_{n}" for n in names)]
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, out)
    summary = f"wrote {len(rows)} predictions for {source.kind} to {out}"
    if loaded.binary:
        positives = sum(1 for r in rows if r[header.index("predicted")] == 1)
        summary += f" ({positives} predicted {names[1]} at threshold {threshold:.4f}{', TTA x8' if cfg.tta else ''})"
    print(summary)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    from histo_dist.config import add_dataclass_arguments

    add_dataclass_arguments(parser, PredictConfig, required=["checkpoint", "input", "output"])


def run(args: argparse.Namespace) -> int:
    from histo_dist.config import from_namespace

    predict(from_namespace(PredictConfig, args, "predict options"))
    return 0
