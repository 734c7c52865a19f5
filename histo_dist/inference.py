"""Running a trained checkpoint: loading it, preparing images the way training did, and TTA.

Shared by `histo-dist evaluate` and `histo-dist predict`, so the same image gives the same
probability whichever command and input format it came through.

- `load_model(path)` rebuilds the network from the checkpoint's own config (architecture, number
  of classes, normalisation) and loads its weights: the EMA weights when the run kept an average
  (that is what training validated and picked the best checkpoint by), else the raw ones. Weights
  that do not fit the architecture the config names are refused with the keys that differ.
- `model_input(images, ...)` turns a uint8 (N, 3, H, W) batch into the normalised float input,
  with the checkpoint's mean/std. Images of another size than the model was trained on are an
  error unless `resize` is asked for (bilinear, antialiased, rounded back to uint8): never silent.
- `predict_probs(model, x, tta=True)` also averages the probabilities (not the logits) over the 8
  symmetries of the square: the identity, 3 rotations by 90 degrees, and each of those mirrored.

Binary models have one logit (probability of class 1 = sigmoid); others one per class (softmax).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from histo_dist.checkpoint import CheckpointError, load_checkpoint
from histo_dist.errors import HistoDistError

log = logging.getLogger(__name__)

TTA_VIEWS = 8


class DataMismatchError(HistoDistError):
    """Data that does not fit the model: another number of classes, or another image size."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: Any
    """The run's ExperimentConfig (rebuilt from the checkpoint)."""
    num_classes: int
    label_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    """(H, W, C) of the patches the model was trained on."""
    weights: str
    """'ema' or 'model': which weights of the checkpoint were loaded."""
    path: Path
    step: int | None = None

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def channels_last(self) -> bool:
        return bool(self.config.train.channels_last)

    def to(self, device: torch.device | str) -> "LoadedModel":
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self


def _strip_prefixes(state: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _describe(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_model(path: str | Path, weights: Literal["auto", "model", "ema"] = "auto") -> LoadedModel:
    """The checkpoint's model on the CPU in eval mode; every problem names the file."""
    from histo_dist.config import ConfigError, from_dict
    from histo_dist.models import num_outputs
    from histo_dist.train import ExperimentConfig

    path = Path(path)
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a histo-dist training checkpoint (a {type(state).__name__}, not a dict)")
    missing = [k for k in ("model", "config", "num_classes") if k not in state]
    if missing:
        raise CheckpointError(
            f"{path}: not a histo-dist training checkpoint: no {', '.join(repr(k) for k in missing)} "
            f"(it has {', '.join(map(repr, list(state)[:8])) or 'nothing'}); pass RUN/checkpoints/best.pt or a step-*.pt file"
        )
    try:
        cfg = from_dict(ExperimentConfig, state["config"], f"config stored in {path}")
    except ConfigError as e:
        raise CheckpointError(f"{path}: its stored config is not readable by this version: {e}") from None
    num_classes = int(state["num_classes"])
    label_names = tuple(state.get("label_names") or (str(i) for i in range(num_classes)))
    image_shape = tuple(int(v) for v in state.get("image_shape") or (96, 96, 3))
    if weights == "auto":
        weights = "ema" if state.get("ema") is not None else "model"
    if weights == "ema":
        if state.get("ema") is None:
            raise CheckpointError(f"{path}: has no EMA weights (the run had train.ema_decay=0); use --weights model")
        weight_state = {k: v for k, v in state["ema"].items() if k != "n_averaged"}
        weight_state = _strip_prefixes(weight_state, ("module.", "_orig_mod."))
    else:
        weight_state = _strip_prefixes(state["model"], ("_orig_mod.", "module."))

    model = _build_without_pretrained(cfg, num_classes)
    expected = model.state_dict()
    absent = [k for k in expected if k not in weight_state]
    extra = [k for k in weight_state if k not in expected]
    reshaped = [f"{k} (checkpoint {tuple(weight_state[k].shape)}, model {tuple(v.shape)})"
                for k, v in expected.items() if k in weight_state and weight_state[k].shape != v.shape]
    if absent or extra or reshaped:
        parts = []
        if absent:
            parts.append(f"{len(absent)} tensor(s) missing ({_describe(absent)})")
        if extra:
            parts.append(f"{len(extra)} unexpected ({_describe(extra)})")
        if reshaped:
            parts.append(f"{len(reshaped)} of another shape ({_describe(reshaped, 2)})")
        raise CheckpointError(
            f"{path}: its {weights} weights do not fit model.name={cfg.model.name} with {num_outputs(num_classes)} "
            f"output(s) for {num_classes} classes, as its config says: {'; '.join(parts)}. "
            "The weights come from another architecture or number of classes than the stored config"
        )
    model.load_state_dict(weight_state)
    model.eval()
    step = state.get("step")
    log.info("loaded %s (%s, %d classes, %s weights, step %s)", path, cfg.model.name, num_classes, weights, step)
    return LoadedModel(model, cfg, num_classes, label_names, image_shape, weights, path, None if step is None else int(step))


def _build_without_pretrained(cfg, num_classes: int) -> nn.Module:
    """The architecture alone: the checkpoint holds every weight, so the pretrained file (which may
    not exist on this machine) is not needed."""
    import dataclasses

    from histo_dist.models import build_model

    return build_model(dataclasses.replace(cfg.model, pretrained=None, freeze="none"), num_classes)


def check_classes(loaded: LoadedModel, num_classes: int, label_names: Sequence[str], where: str) -> None:
    """Refuse data whose labels the model cannot speak about."""
    if num_classes != loaded.num_classes:
        raise DataMismatchError(
            f"{loaded.path} was trained for {loaded.num_classes} classes ({', '.join(loaded.label_names)}), "
            f"but {where} has {num_classes} ({', '.join(label_names)}): evaluate a checkpoint trained on this kind of data"
        )
    if tuple(label_names) != tuple(loaded.label_names):
        log.warning("label names differ: checkpoint %s, data %s (taken as the same classes, in this order)",
                    ", ".join(loaded.label_names), ", ".join(label_names))


def check_size(loaded: LoadedModel, height: int, width: int, where: str, resize: bool) -> None:
    h, w = loaded.image_shape[:2]
    if (height, width) != (h, w) and not resize:
        raise DataMismatchError(
            f"{where}: images are {width}x{height} pixels, but {loaded.path.name} was trained on {w}x{h} patches; "
            f"pass --resize to resize them to {w}x{h} (bilinear, antialiased), or give patches of that size"
        )


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, *size), bilinear with antialiasing, rounded."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    x = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def model_input(images: torch.Tensor, loaded: LoadedModel, resize: bool = False, where: str = "input") -> torch.Tensor:
    """uint8 (N, 3, H, W) on any device -> the normalised float32 batch the model takes."""
    from histo_dist.augment import normalize_only

    check_size(loaded, images.shape[-2], images.shape[-1], where, resize)
    images = resize_uint8(images, tuple(loaded.image_shape[:2]))
    x = normalize_only(images.contiguous(), loaded.config.augment)
    if loaded.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def dihedral_views(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The 8 symmetries of the square applied to (N, C, H, W): rotations by 0/90/180/270 degrees,
    each also mirrored left-right. The identity comes first."""
    for k in range(4):
        rotated = torch.rot90(x, k, dims=(-2, -1))
        yield rotated
        yield rotated.flip(-1)


def logits_to_probs(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = logits.float()
    return torch.sigmoid(logits.reshape(-1)) if num_classes == 2 else torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, num_classes: int, tta: bool = False,
                  channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probabilities of the plain batch, their mean over the 8 symmetric views or None).

    Binary: (N,) probabilities of class 1; multi-class: (N, K). TTA averages probabilities,
    view by view in a fixed order (the result does not depend on the batch composition)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, total = None, None
    for view in (dihedral_views(x) if tta else [x]):
        probs = logits_to_probs(model(view.contiguous(memory_format=fmt)), num_classes)
        if plain is None:
            plain, total = probs, probs.clone()
        else:
            total += probs
    return plain, (total / TTA_VIEWS if tta else None)
