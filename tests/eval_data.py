"""Checkpoints and datasets for the evaluation and prediction tests.

`trained_run` trains a tiny model in-process on learnable 32x32 shards (once per test session: the
run is kept under pytest's base temp folder and reused by both test modules). `make_checkpoint`
writes an untrained checkpoint of any architecture and number of classes in the trainer's format,
for the bad-input and multi-class paths that need no learning.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from histo_dist.checkpoint import FORMAT
from histo_dist.config import to_dict
from histo_dist.manifest import Manifest
from tests.shard_data import label_of, make_dataset

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 3)
SIZES = {"train": [120, 100], "valid": [40, 33], "test": [37, 40, 23]}  # uneven shards: ranks split mid-shard


def noisy_label(index: int) -> int:
    """The label of tests.shard_data's learnable image `index`, flipped for about 1 in 6 samples, so
    that no model is perfect (thresholds, intervals and error grids then have something to show)."""
    return label_of(index) ^ int((index * 37) % 100 < 16)


def make_noisy_dataset(root: Path, sizes: dict[str, list[int]] = SIZES, shape=SHAPE) -> Manifest:
    """Learnable shards (a bright centre square on positives) with noisy labels; keys are split_index."""
    return make_dataset(root, sizes, shape, learnable=True, label_fn=noisy_label)


def trained_run(base: Path) -> tuple[Path, Path]:
    """(shard folder, run folder) of a tiny trained binary model; made once under `base`."""
    from histo_dist.experiment import load_experiment
    from histo_dist.train import train

    shards, run = base / "eval-shards", base / "eval-run"
    if not (shards / "manifest.json").exists():
        make_noisy_dataset(shards)
    if not (run / "checkpoints" / "best.pt").exists():
        cfg = load_experiment(
            ROOT / "configs/cpu_test.yaml",
            [
                f"data.shards={shards}",
                "loader.batch_size=16",
                "loader.eval_batch_size=100",
                "loader.num_workers=0",
                "train.epochs=2",
                "schedule.warmup_steps=3",
                "tracking.wandb=false",
                "tracking.progress=false",
                "tracking.log_every_steps=2",
                "augment.where=device",
            ],
        )
        train(cfg, run)
    return shards, run


def make_checkpoint(
    path: Path,
    num_classes: int = 2,
    shape=SHAPE,
    model: str = "simple_cnn",
    label_names: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """An untrained checkpoint as the trainer writes it (weights, config, classes, image shape)."""
    from histo_dist.experiment import load_experiment
    from histo_dist.models import build_model

    cfg = load_experiment(None, [f"model.name={model}"])
    torch.manual_seed(seed)
    net = build_model(cfg.model, num_classes)
    state = {
        "format": FORMAT,
        "step": 0,
        "model": net.state_dict(),
        "config": to_dict(cfg),
        "num_classes": num_classes,
        "label_names": label_names or [f"class{i}" for i in range(num_classes)],
        "image_shape": list(shape),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def make_multiclass_dataset(root: Path, sizes: dict[str, list[int]], num_classes: int = 3, shape=SHAPE) -> Manifest:
    """Shards of random patches with labels 0..num_classes-1 (class c brightens channel c)."""

    def image(j: int) -> np.ndarray:
        x = np.random.default_rng(j).integers(0, 200, size=shape, dtype=np.uint8)
        c = j % num_classes % 3
        x[..., c] //= 2
        x[..., c] += 100
        return x

    return make_dataset(
        root,
        sizes,
        shape,
        label_fn=lambda j: j % num_classes,
        image_fn=image,
        label_names=tuple(f"class{c}" for c in range(num_classes)),
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_png(path: Path) -> bool:
    from PIL import Image

    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size[0] > 200 and im.size[1] > 200


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
