"""A trained model as evaluation and prediction use it: weights, input contract, TTA.

`InferenceModel` is a classifier together with what feeding it takes: the normalisation it was
trained with, its patch size and memory format. The trainer wraps its live model in one for
validation and test; `load_inference_model(path)` rebuilds one from a checkpoint for `evaluate`
and `predict`. Both then go through the same `inputs()` and `probabilities()`, so the same image
gives the same probability whichever command and input format it came through.

- The checkpoint's own config names the architecture, the number of classes and the
  normalisation; its EMA weights are taken when the run kept an average (that is what training
  validated and picked the best checkpoint by), else the raw ones.
- `inputs(images)` turns a uint8 (N, 3, H, W) batch into the normalised float input. Images of
  another size than the model was trained on are an error unless `resize` is asked for (bilinear,
  antialiased, rounded back to uint8): never silent. A probe's input is a batch of embeddings
  (N, D), taken as float32.
- `probabilities(x, tta=True)` also averages the probabilities (not the logits) over the 8
  symmetries of the square (`augment.dihedral_views`).

Binary models have one logit (probability of class 1 = sigmoid); others one per class (softmax).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from histo_dist.augment import AugmentConfig, dihedral_views, eval_transform
from histo_dist.checkpoint import CheckpointError, model_weights, read_training_checkpoint
from histo_dist.errors import HistoDistError

log = logging.getLogger(__name__)


class DataMismatchError(HistoDistError):
    """Data that does not fit the model: another number of classes, or another image size."""


@dataclass
class InferenceOptions:
    """What `histo-dist evaluate` and `histo-dist predict` share: the checkpoint and how to run it."""

    checkpoint: str = ""
    """Checkpoint file, e.g. RUN/checkpoints/best.pt (its run's metrics.jsonl gives evaluate's learning curves)."""
    weights: Literal["auto", "model", "ema"] = "auto"
    """Which weights of the checkpoint: 'auto' takes the EMA average when the run kept one, else the model's."""
    batch_size: int = 256
    """Images per forward pass on each rank (TTA runs 8 passes per batch)."""
    num_workers: int = 1
    """Loader worker processes per rank for shard input (0 reads in the main process)."""
    resize: bool = False
    """Resize images of another size than the model was trained on (bilinear, antialiased); without it they are an
    error."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision of the forward passes."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    cpu_keep_freed_memory: bool = True
    """On the CPU, keep the memory PyTorch frees in the process (glibc's malloc; as train.cpu_keep_freed_memory):
    evaluation with TTA on two cores took 11.3-11.7 s instead of 15.0-16.4 s. Off where memory is tighter than time."""
    progress: bool = True
    """Show a progress bar (on rank 0)."""

    def validate(self) -> list[str]:
        problems = [] if self.checkpoint else ["checkpoint: required"]
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            problems.append(f"num_workers: must be >= 0, got {self.num_workers}")
        return problems

    def loader_config(self):
        """The loader settings for reading shards with these options."""
        from histo_dist.loader import LoaderConfig

        return LoaderConfig(eval_batch_size=self.batch_size, num_workers=self.num_workers)


@dataclass
class InferenceModel:
    model: nn.Module
    """The classifier, in eval mode for inference."""
    num_classes: int
    label_names: tuple[str, ...]
    image_shape: tuple[int, ...]
    """(H, W, C) of the patches the model was trained on; (D,) for a probe trained on embeddings."""
    augment: AugmentConfig
    """The run's augmentation section: its normalisation is applied to every input."""
    channels_last: bool
    model_name: str
    weights: str = "model"
    """'ema' or 'model': which weights these are."""
    path: Path | None = None
    """The checkpoint they came from, if any."""
    step: int | None = None

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def to(self, device: torch.device | str) -> InferenceModel:
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    def inputs(self, images: torch.Tensor, resize: bool = False, where: str = "input") -> torch.Tensor:
        """uint8 (N, 3, H, W) on any device -> the normalised float32 batch the model takes; embeddings (N, D) ->
        float32."""
        if images.dim() == 2:
            return images.float()
        check_size(self, images.shape[-2], images.shape[-1], where, resize)
        images = resize_uint8(images, tuple(self.image_shape[:2]))
        x = eval_transform(images.contiguous(), self.augment)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(probabilities of the plain batch, their mean over the 8 symmetric views or None).

        Binary: (N,) probabilities of class 1; multi-class: (N, K). TTA averages probabilities,
        view by view in a fixed order (the result does not depend on the batch composition)."""
        self.model.eval()
        if tta and x.dim() != 4:
            raise DataMismatchError("TTA averages over the symmetries of images; these inputs are embeddings")
        fmt = torch.channels_last if self.channels_last and x.dim() == 4 else torch.contiguous_format
        plain, total = None, None
        for view in dihedral_views(x) if tta else [x]:
            probs = logits_to_probs(self.model(view.contiguous(memory_format=fmt)), self.num_classes)
            if plain is None:
                plain, total = probs, probs.clone()
            else:
                total += probs
        return plain, (total / 8 if tta else None)


def autocast(device: torch.device, mixed_precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for `mixed_precision` ('no', 'fp16', 'bf16') on `device`."""
    if mixed_precision == "no":
        return contextlib.nullcontext
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def logits_to_probs(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits.reshape(-1)) if num_classes == 2 else torch.softmax(logits, dim=1)


def load_inference_model(path: str | Path, weights: Literal["auto", "model", "ema"] = "auto") -> InferenceModel:
    """The checkpoint's model on the CPU in eval mode; every problem names the file."""
    from histo_dist.config import ConfigError, from_dict
    from histo_dist.experiment import ExperimentConfig
    from histo_dist.models import build_model, describe_mismatch, num_outputs

    path = Path(path)
    state = read_training_checkpoint(path)
    try:
        cfg = from_dict(ExperimentConfig, state["config"], f"config stored in {path}")
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config is not readable by this version: {e}") from None
    num_classes = int(state["num_classes"])
    image_shape = tuple(int(v) for v in state.get("image_shape") or (96, 96, 3))
    weight_state, weights = model_weights(state, weights, path)
    # The architecture alone: the checkpoint holds every weight, so the pretrained file (which may
    # not exist on this machine) is not needed.
    model = build_model(
        dataclasses.replace(cfg.model, pretrained=None, init_from=None, freeze="none"), num_classes, image_shape
    )
    mismatch = describe_mismatch(model.state_dict(), weight_state)
    if mismatch:
        raise CheckpointError(
            f"{path}: its {weights} weights do not fit model.name={cfg.model.name} with {num_outputs(num_classes)} "
            f"output(s) for {num_classes} classes, as its config says: {mismatch}. "
            "The weights come from another architecture or number of classes than the stored config"
        )
    model.load_state_dict(weight_state)
    model.eval()
    step = state.get("step")
    log.info("loaded %s (%s, %d classes, %s weights, step %s)", path, cfg.model.name, num_classes, weights, step)
    return InferenceModel(
        model=model,
        num_classes=num_classes,
        label_names=tuple(state.get("label_names") or (str(i) for i in range(num_classes))),
        image_shape=image_shape,
        augment=cfg.augment,
        channels_last=cfg.train.channels_last,
        model_name=cfg.model.name,
        weights=weights,
        path=path,
        step=None if step is None else int(step),
    )


def check_classes(model: InferenceModel, num_classes: int, label_names: Sequence[str], where: str) -> None:
    """Refuse data whose labels the model cannot speak about."""
    if num_classes != model.num_classes:
        raise DataMismatchError(
            f"{model.path} was trained for {model.num_classes} classes ({', '.join(model.label_names)}), "
            f"but {where} has {num_classes} ({', '.join(label_names)}): evaluate a checkpoint trained on this kind "
            "of data"
        )
    if tuple(label_names) != tuple(model.label_names):
        log.warning(
            "label names differ: checkpoint %s, data %s (taken as the same classes, in this order)",
            ", ".join(model.label_names),
            ", ".join(label_names),
        )


def check_data(model: InferenceModel, shape: Sequence[int], where: str, resize: bool) -> None:
    """Refuse data of another kind (images, embeddings) or size than the model was trained on (images of another
    size pass with `resize`)."""
    trained = model.path.name if model.path else "the model"
    if len(shape) == 1 and len(model.image_shape) != 1:
        raise DataMismatchError(
            f"{where}: holds embeddings, and {trained} ({model.model_name}) takes images: give it the image shards, "
            "or give these embeddings to a probe trained on them (linear_probe, mlp_probe)"
        )
    if len(shape) != 1 and len(model.image_shape) == 1:
        raise DataMismatchError(
            f"{where}: holds images, and {trained} ({model.model_name}) is a head on embeddings: give it embeddings "
            "of these images (`histo-dist embed` with the backbone it was trained on)"
        )
    if len(shape) == 1 and tuple(shape) != tuple(model.image_shape):
        raise DataMismatchError(
            f"{where}: embeddings of {shape[0]} values, and {trained} was trained on embeddings of "
            f"{model.image_shape[0]}: embed with the backbone the probe was trained on"
        )
    if len(shape) == 3:
        check_size(model, shape[0], shape[1], where, resize)


def check_size(model: InferenceModel, height: int, width: int, where: str, resize: bool) -> None:
    h, w = model.image_shape[:2]
    if (height, width) != (h, w) and not resize:
        trained = model.path.name if model.path else "the model"
        raise DataMismatchError(
            f"{where}: images are {width}x{height} pixels, but {trained} was trained on {w}x{h} patches; "
            f"pass --resize to resize them to {w}x{h} (bilinear, antialiased), or give patches of that size"
        )


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, *size), bilinear with antialiasing, rounded."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)
