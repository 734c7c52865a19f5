"""Models by name: small CNNs, torchvision and timm backbones, and heads on embeddings (probes).

`build_model(cfg, num_classes, input_shape)` returns a `Classifier`: the registry network (`.net`,
keeping the torchvision or timm module names so their state dicts load as they are) whose final
Linear is replaced by `Dropout -> Linear(num_outputs)`. Binary tasks get ONE logit (trained with
BCEWithLogitsLoss), others one logit per class. Image models take (N, 3, H, W) batches; probes
(`linear_probe`, `mlp_probe`) take (N, D) embeddings written by `histo-dist embed`.

`timm/<name>` is any model timm builds (`timm/vit_small_patch16_224`, or
`timm/hf-hub:bioptimus/H-optimus-0` with its config.json in the local Hugging Face cache), with
`model.kwargs` passed to `timm.create_model`. Its input side and normalisation come from its
pretrained config (`input_defaults`); its stages are the groups of timm's `group_matcher`.

Transfer learning:
- `pretrained` loads backbone weights, never over the network: "imagenet" (or a torchvision weights
  name) from the local torch hub cache; "hub" for a timm model's own weights from the local Hugging
  Face cache (HF_HUB_OFFLINE); or a state dict file. The head is always freshly initialised.
- `freeze` stops gradients for the whole backbone ("all") or for every stage up to and including a
  named one; `Classifier.train()` keeps frozen batch norms in eval mode so their running statistics
  stay those of the pretrained weights.
- `head_parameters()` / `backbone_parameters()` let the optimizer give the backbone a lower lr.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from histo_dist.checkpoint import WRAPPER_PREFIXES, model_weights, read_training_checkpoint, strip_prefixes
from histo_dist.config import ConfigError
from histo_dist.errors import HistoDistError

log = logging.getLogger(__name__)


class ModelError(HistoDistError):
    """A model that cannot be built as asked: weights missing, unreadable or not fitting the architecture."""


# ---------------------------------------------------------------------------------------------
# The seed project's CNN


class SimpleCNN(nn.Module):
    """Four conv blocks (32-64-128-128 channels, each halving the size) and two Linear layers.

    Sized for 96x96 patches (96 / 2**4 = 6); small enough to train on a CPU.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        blocks, channels = [], 3
        for out in (32, 64, 128, 128):
            blocks.append(nn.Sequential(nn.Conv2d(channels, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            channels = out
        self.features = nn.Sequential(*blocks)
        # Identity at 96x96; lets other patch sizes through to the fixed-size Linear.
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(128 * 6 * 6, 256), nn.ReLU(inplace=True))
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.pool(self.features(x))))


# ---------------------------------------------------------------------------------------------
# Compact CNNs for patches: fast on two CPU cores (bf16, channels_last), unchanged on a GPU


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, added to the input (an average-pooled 1x1 conv-BN where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.convs = nn.Sequential(_conv_bn_relu(cin, cout, stride), _conv_bn_relu(cout, cout, relu=False))
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.convs[1][1].weight)  # each block starts as the identity: deep nets train from step 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.convs(x) + self.shortcut(x))


class CompactCNN(nn.Module):
    """A 3x3 conv-BN-ReLU stem of `width` channels, then one stage per entry of `depths`: each stage after the
    first halves the resolution and doubles the channels (up to 16 x width); a stage is `depth` conv-BN-ReLU
    layers after a 2x2 max-pool (plain) or `depth` residual basic blocks, the first with stride 2 (residual).
    A stem with `stem_stride` > 1 downsamples too: the stages then cost what they cost on a smaller input,
    and the stem's learnt filters see every pixel of the larger one. Global average pooling and a Linear layer;
    any input size."""

    def __init__(
        self, width: int, depths: tuple[int, ...], residual: bool, num_classes: int = 1000, stem_stride: int = 1
    ):
        super().__init__()
        self.stem = _conv_bn_relu(3, width, stride=stem_stride)
        stages, cin = [], width
        for i, depth in enumerate(depths):
            cout = width * 2 ** min(i, 4)
            if residual:
                blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1) for j in range(depth)]
            else:
                blocks = [nn.MaxPool2d(2)] if i > 0 else []
                blocks += [_conv_bn_relu(cin if j == 0 else cout, cout) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A mean, not AdaptiveAvgPool2d: the same numbers, and a deterministic backward on CUDA.
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def _compact_stages(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    return {"stem": ("stem",), **{f"stage{i + 1}": (f"stages.{i}",) for i in range(len(cfg.depths))}}


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Architecture:
    head: str | Callable[[ModelConfig], str]
    """Dotted path of the final Linear in `build()`'s network; build_model replaces it (or a function of the model
    config giving it)."""
    stages: dict[str, tuple[str, ...]] | Callable[[ModelConfig], dict[str, tuple[str, ...]]]
    """Stage name -> dotted module (or parameter) paths, in forward order; together they hold every backbone
    parameter (or a function of the model config giving them)."""
    build: Callable[[ModelConfig, tuple[int, ...] | None], nn.Module]
    """The network of the model config for inputs of a shape ((H, W, C) images, (D,) embeddings; None: unknown);
    randomly initialised unless the architecture loads its own weights (timm); never downloads."""
    torchvision: bool = True
    """Has torchvision weights (resolved by the registry name)."""
    inputs: Literal["images", "embeddings"] = "images"
    """What the network takes: uint8 images made into (N, 3, H, W) floats, or (N, D) embedding vectors."""
    loads_weights: bool = False
    """`build` loads `model.pretrained` itself (timm); else build_model loads it with `_load_backbone`."""

    def head_of(self, cfg: ModelConfig) -> str:
        return self.head(cfg) if callable(self.head) else self.head

    def stages_of(self, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
        return self.stages(cfg) if callable(self.stages) else self.stages


def _torchvision(name: str) -> Callable[[ModelConfig, Any], nn.Module]:
    def build(cfg: ModelConfig, input_shape: tuple[int, ...] | None) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    return build


def _paths(prefix: str, indices: range) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in indices)


_RESNET_STAGES = {"stem": ("conv1", "bn1"), **{f"layer{i}": (f"layer{i}",) for i in range(1, 5)}}

ARCHITECTURES: dict[str, Architecture] = {
    "simple_cnn": Architecture(
        head="fc",
        stages={**{f"block{i + 1}": (f"features.{i}",) for i in range(4)}, "hidden": ("hidden",)},
        build=lambda cfg, shape: SimpleCNN(),
        torchvision=False,
    ),
    "compact_cnn": Architecture(
        head="fc",
        stages=_compact_stages,
        build=lambda cfg, shape: CompactCNN(cfg.width, cfg.depths, residual=False, stem_stride=cfg.stem_stride),
        torchvision=False,
    ),
    "compact_resnet": Architecture(
        head="fc",
        stages=_compact_stages,
        build=lambda cfg, shape: CompactCNN(cfg.width, cfg.depths, residual=True, stem_stride=cfg.stem_stride),
        torchvision=False,
    ),
    **{name: Architecture("fc", _RESNET_STAGES, _torchvision(name)) for name in ("resnet18", "resnet34", "resnet50")},
    "densenet121": Architecture(
        head="classifier",
        stages={  # blockN = denseblockN and the transition after it
            "stem": ("features.conv0", "features.norm0"),
            **{f"block{i}": (f"features.denseblock{i}", f"features.transition{i}") for i in (1, 2, 3)},
            "block4": ("features.denseblock4", "features.norm5"),
        },
        build=_torchvision("densenet121"),
    ),
    "vgg16_bn": Architecture(
        head="classifier.6",
        stages={  # blocks end at each MaxPool of `features` (conv, bn, relu per conv layer); fc = fc6, fc7
            "block1": _paths("features", range(0, 7)),
            "block2": _paths("features", range(7, 14)),
            "block3": _paths("features", range(14, 24)),
            "block4": _paths("features", range(24, 34)),
            "block5": _paths("features", range(34, 44)),
            "fc": _paths("classifier", range(0, 6)),
        },
        build=_torchvision("vgg16_bn"),
    ),
    "efficientnet_b0": Architecture(
        head="classifier.1",
        stages={
            "stem": ("features.0",),
            **{f"stage{i}": (f"features.{i}",) for i in range(1, 8)},
            "top": ("features.8",),  # the final 1x1 conv to 1280 channels
        },
        build=_torchvision("efficientnet_b0"),
    ),
    "convnext_tiny": Architecture(
        head="classifier.2",
        stages={  # stages 2-4 start with their downsampling layer; the final norm sits in `classifier`
            "stem": ("features.0",),
            "stage1": ("features.1",),
            "stage2": ("features.2", "features.3"),
            "stage3": ("features.4", "features.5"),
            "stage4": ("features.6", "features.7", "classifier.0"),
        },
        build=_torchvision("convnext_tiny"),
    ),
    "linear_probe": Architecture(
        head="fc",
        stages={},
        build=lambda cfg, shape: Probe(_embedding_size(cfg, shape)),
        torchvision=False,
        inputs="embeddings",
    ),
    "mlp_probe": Architecture(
        head="fc",
        stages={"hidden": ("hidden",)},
        build=lambda cfg, shape: Probe(_embedding_size(cfg, shape), hidden=cfg.width),
        torchvision=False,
        inputs="embeddings",
    ),
}
MODEL_NAMES = tuple(ARCHITECTURES)
TIMM_PREFIX = "timm/"


def architecture(name: str) -> Architecture | None:
    """The registry's architecture of `name` (`timm/<name>` for any timm model), or None when unknown."""
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        return _TIMM
    return ARCHITECTURES.get(name)


# ---------------------------------------------------------------------------------------------
# Heads on embeddings


class Probe(nn.Module):
    """A head on embeddings: one Linear layer (linear_probe), or Linear-ReLU to `hidden` units, then the Linear
    layer (mlp_probe)."""

    def __init__(self, dim: int, hidden: int = 0, num_classes: int = 1000):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.fc = nn.Linear(hidden or dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(x))


def _embedding_size(cfg: ModelConfig, input_shape: tuple[int, ...] | None) -> int:
    if input_shape is None or len(input_shape) != 1:
        raise ModelError(f"model.name={cfg.name}: built for embeddings of a known size, got input shape {input_shape}")
    return int(input_shape[0])


# ---------------------------------------------------------------------------------------------
# timm backbones: built, and their weights found, without any download


def _timm_name(cfg: ModelConfig) -> str:
    return cfg.name.removeprefix(TIMM_PREFIX)


_CLASS_PATH = re.compile(r"^(?:timm|torch)(?:\.\w+)+$")


def resolve_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """model.kwargs for timm.create_model: strings that name a class or function of timm or torch
    ('timm.layers.SwiGLUPacked', 'torch.nn.SiLU') become it; ModelError names a key that names nothing.
    num_classes (model cards give 0) is left out: the backbone is always built without classifier."""
    out = {}
    for key, value in kwargs.items():
        if key == "num_classes":
            continue
        if isinstance(value, str) and _CLASS_PATH.match(value):
            module, _, attr = value.rpartition(".")
            try:
                value = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError):
                raise ModelError(f"kwargs.{key}: {value!r} names nothing importable (no {attr} in {module})") from None
        out[key] = value
    return out


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE for what runs inside: Hugging Face lookups answer from the local cache or fail, never
    download (huggingface_hub reads the variable at import, so its constant is set too)."""
    import huggingface_hub.constants as hf

    saved_env, saved_constant = os.environ.get("HF_HUB_OFFLINE"), hf.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hf.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hf.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _hf_cached(repo: str, filename: str) -> Path | None:
    """A file of a Hugging Face repo ('org/name' or 'org/name@revision') in the local cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
    return Path(found) if isinstance(found, str) else None


def _hf_missing(what: str, repo: str, files: list[str]) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    repo_id = repo.partition("@")[0]
    return (
        f"{what} are not in the local Hugging Face cache ({HF_HUB_CACHE}), and histo-dist never downloads at run "
        f"time. On a machine with network (for a gated repo, accept its terms on huggingface.co and run "
        f"`hf auth login` first):\n  hf download {repo_id} {' '.join(files)}\nthen copy "
        f"{Path(HF_HUB_CACHE) / ('models--' + repo_id.replace('/', '--'))} into this machine's cache "
        "(HF_HOME or HF_HUB_CACHE say where it is)"
    )


@functools.lru_cache(maxsize=8)
def _timm_skeleton_of(name: str, kwargs_json: str) -> nn.Module:
    import timm

    if name.startswith(("hf-hub:", "hf_hub:")):
        repo = name.split(":", 1)[1]
        if _hf_cached(repo, "config.json") is None:
            raise ModelError(
                f"model.name=timm/{name}: "
                + _hf_missing("its config.json and weights", repo, ["config.json", "model.safetensors"])
            )
    elif not name.startswith("local-dir:") and not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f" (did you mean 'timm/{close[0]}'?)" if close else ""
        raise ModelError(f"model.name=timm/{name}: timm {timm.__version__} has no such model{hint}")
    kwargs = resolve_kwargs(json.loads(kwargs_json))
    with _hf_offline(), torch.device("meta"):  # no memory, no initialisation: only the structure
        try:
            skeleton = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise ModelError(
                f"timm.create_model({name!r}, **model.kwargs={kwargs}) failed: {type(e).__name__}: {e}"
            ) from None
    classifier = skeleton.pretrained_cfg.get("classifier")
    if not isinstance(classifier, str):
        raise ModelError(
            f"model.name=timm/{name}: its classifier is {classifier!r}, not one Linear layer; not supported"
        )
    return skeleton


def timm_skeleton(cfg: ModelConfig) -> nn.Module:
    """The timm model of the config on the meta device (its structure and pretrained config: no weights, no
    memory), built once; ModelError names what is wrong (an unknown name, kwargs timm refuses, a missing hub
    config)."""
    return _timm_skeleton_of(_timm_name(cfg), json.dumps(cfg.kwargs, sort_keys=True))


def _timm_stages(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """timm's own grouping of the parameters (`group_matcher(coarse=True)`, what it uses for layer-wise lr decay):
    'stem', then each group named by where it starts: a ViT's blocks.0 .. blocks.N (the final norm with the last),
    a ResNet's layer1 .. layer4, a ConvNeXt's stages.0 .. stages.3; parameter paths."""
    from timm.models import group_parameters

    skeleton = timm_skeleton(cfg)
    try:
        matcher = skeleton.group_matcher(coarse=True)
    except (AttributeError, NotImplementedError):
        return {}
    blocks = matcher.get("blocks", [])
    patterns = [blocks] if isinstance(blocks, str) else [b if isinstance(b, str) else b[0] for b in blocks]
    stages: dict[str, tuple[str, ...]] = {}
    for i, names in enumerate(group_parameters(skeleton, matcher).values()):
        found = (re.match(p, names[0]) for p in patterns)
        label = "stem" if i == 0 else next((m.group(0) for m in found if m), names[0].rpartition(".")[0])
        stages[label if label not in stages else f"{label}#{i}"] = tuple(names)
    return stages


def _timm_head(cfg: ModelConfig) -> str:
    return timm_skeleton(cfg).pretrained_cfg["classifier"]


def _timm_weights_file(cfg: ModelConfig) -> Path:
    """The local file of `model.pretrained` for a timm model: a path, or 'hub' = the weights of the model's
    pretrained config in the local Hugging Face cache (or the torch hub cache for weights timm knows by URL)."""
    if cfg.pretrained != "hub":
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise ModelError(
                f"model.pretrained={cfg.pretrained!r}: no such file; give 'hub' (the weights of {cfg.name} from the "
                "local Hugging Face cache) or the path of a state dict file (.safetensors, .pth, .bin)"
            )
        return path
    pcfg = timm_skeleton(cfg).pretrained_cfg
    repo, url = pcfg.get("hf_hub_id"), pcfg.get("url")
    if repo:
        files = [pcfg["hf_hub_filename"]] if pcfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for name in files:
            found = _hf_cached(repo, name)
            if found is not None:
                return found
        what = f"model.pretrained=hub: the weights of {cfg.name} (Hugging Face repo {repo}, file {files[0]})"
        raise ModelError(_hf_missing(what, repo, files[:1]) + ", or set model.pretrained to the file's path")
    if url:
        path = hub_weights_path(url)
        if not path.is_file():
            raise ModelError(
                f"model.pretrained=hub: the weights of {cfg.name} are not in the local torch hub cache, and histo-dist "
                f"never downloads at run time. On a machine with network, fetch\n  {url}\nand put the file at\n  "
                f"{path}\nor set model.pretrained to the file's path"
            )
        return path
    raise ModelError(f"model.pretrained=hub: timm knows no weights of {cfg.name}; give the path of a state dict file")


def _build_timm(cfg: ModelConfig, input_shape: tuple[int, ...] | None) -> nn.Module:
    """The timm network without its classifier (a placeholder Linear sits at its path), with `model.pretrained`
    loaded through timm's own filter (position embeddings resampled to model.kwargs.img_size, old key names
    mapped), strictly: every backbone weight must come from the file."""
    import timm

    skeleton = timm_skeleton(cfg)
    name, kwargs = _timm_name(cfg), resolve_kwargs(cfg.kwargs)
    head = skeleton.pretrained_cfg["classifier"]
    with _hf_offline():
        if not cfg.pretrained:
            net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        else:
            path = _timm_weights_file(cfg)
            state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith(head + ".")}
            # The state dict goes in as the pretrained config's source (never a download), and the model is built
            # without classifier so that timm loads strictly.
            overlay = {"state_dict": state, "num_classes": 0, "source": "timm", "custom_load": False}
            try:
                net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs)
            except (RuntimeError, KeyError, ValueError) as e:
                detail = str(e).replace("\n", " ")
                raise ModelError(
                    f"weights file {path} does not fit {cfg.name}"
                    + (f" with model.kwargs={cfg.kwargs}" if cfg.kwargs else "")
                    + f": {detail[:600]}{' ...' if len(detail) > 600 else ''}"
                ) from None
            net.pretrained_cfg.pop("state_dict", None)  # the model keeps its config: not a second copy of the weights
            log.info("model %s: backbone weights loaded from %s", cfg.name, path)
    features = getattr(net, "head_hidden_size", None) or net.num_features
    net.set_submodule(head, nn.Linear(features, 1))  # replaced by build_model's Head
    return net


_TIMM = Architecture(head=_timm_head, stages=_timm_stages, build=_build_timm, torchvision=False, loads_weights=True)


def input_defaults(cfg: ModelConfig) -> dict[str, Any]:
    """What the model says about its input, as augment values: a timm model's side (model.kwargs.img_size, else
    its pretrained config's input size) and normalisation (mean, std); {} for the others."""
    if architecture(cfg.name) is not _TIMM:
        return {}
    pcfg = timm_skeleton(cfg).pretrained_cfg
    size = cfg.kwargs.get("img_size") or pcfg.get("input_size", (3, 224, 224))[1:]
    side = size if isinstance(size, int) else max(size)
    return {
        "resize": int(side),
        "mean": tuple(pcfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(pcfg.get("std", IMAGENET_STD)),
    }


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_input_side(cfg: ModelConfig, side: int, where: str) -> None:
    """Refuse inputs of another side than a fixed-size timm model takes (a ViT without dynamic_img_size)."""
    if architecture(cfg.name) is not _TIMM:
        return
    skeleton = timm_skeleton(cfg)
    patch_embed = getattr(skeleton, "patch_embed", None)
    fixed = getattr(patch_embed, "img_size", None) if getattr(patch_embed, "strict_img_size", False) else None
    if fixed and not getattr(skeleton, "dynamic_img_size", False) and tuple(fixed) != (side, side):
        raise ModelError(
            f"{where}: {cfg.name} takes {fixed[1]}x{fixed[0]} inputs, and gets {side}x{side}: set augment.resize="
            f"{fixed[0]}, or model.kwargs.img_size={side} (pretrained position embeddings are resampled), or "
            "model.kwargs.dynamic_img_size=true"
        )


def _is_weights_name(pretrained: str) -> bool:
    """Spelled like torchvision weights (imagenet, IMAGENET1K_V2, DEFAULT): never taken for a file path,
    so a misspelt name is reported as such rather than as a missing file."""
    return pretrained.lower() == "imagenet" or re.fullmatch(r"[A-Z0-9_]+", pretrained) is not None


def freeze_choices(cfg: ModelConfig) -> tuple[str, ...]:
    return ("none", "all", *architecture(cfg.name).stages_of(cfg))


def num_outputs(num_classes: int) -> int:
    """Logits per sample: 1 for binary tasks (BCEWithLogitsLoss), else one per class."""
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
    return 1 if num_classes == 2 else num_classes


@dataclass
class ModelConfig:
    name: str = "simple_cnn"
    """Architecture: simple_cnn, compact_cnn, compact_resnet, resnet18, resnet34, resnet50, densenet121, vgg16_bn,
    efficientnet_b0, convnext_tiny; timm/<name> for any timm model (timm/vit_small_patch16_224,
    timm/hf-hub:bioptimus/H-optimus-0 with its config.json in the local Hugging Face cache); on embeddings
    (`histo-dist embed`): linear_probe, mlp_probe."""
    pretrained: str | None = None
    """Backbone weights: null = random init; "imagenet" (or a torchvision weights name such as IMAGENET1K_V1) = from the
    local torch hub cache, never downloaded; "hub" (timm models) = the weights of the model's pretrained config from
    the local Hugging Face cache, never downloaded; else the path of a state dict file (torch.load or .safetensors)."""
    init_from: str | None = None
    """A training checkpoint (RUN/checkpoints/best.pt or step-*.pt) whose model weights, head included, start this
    run (its trained weights, not its EMA average); optimizer, schedule and data order start fresh. The way to go on
    training with values a resume refuses to change (learning rate, epochs, the global batch...): a new run dir."""
    freeze: str = "none"
    """Frozen part: none, all (train only the new head), or a stage name freezing the stem up to and including it
    (resnets: stem, layer1..layer4; timm: stem, then timm's groups, e.g. blocks.0..blocks.11 of a ViT-B)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """timm models: keyword arguments of timm.create_model, e.g. {init_values: 1.0e-5, mlp_layer:
    timm.layers.SwiGLUPacked, act_layer: torch.nn.SiLU, img_size: 96}; strings naming a class of timm or torch are
    resolved to it; num_classes is ignored (the backbone is built without classifier, then gets the new head)."""
    dropout: float = 0.0
    """Dropout right before the new classification layer (on top of any the architecture has)."""
    width: int = 32
    """compact_cnn, compact_resnet: channels of the first stage (doubled at each stage after it, at most 16x);
    mlp_probe: hidden units."""
    depths: tuple[int, ...] = (1, 1, 1, 1)
    """compact_cnn, compact_resnet: conv layers (compact_cnn) or residual blocks (compact_resnet) of each stage; each
    stage after the first halves the resolution."""
    stem_init: Literal["default", "whiten"] = "default"
    """compact_cnn, compact_resnet: "whiten" sets the stem's 3x3 filters, before the first step, to whitening filters
    of the training images (`whiten_stem_`), which then train as the rest; "default" keeps the random init. The fast
    CPU recipe at 300 s: +0.011 best valid AUROC on each of 3 seeds, test AUROC equal (docs/benchmarks.md)."""
    stem_stride: int = 1
    """compact_cnn, compact_resnet: stride of the 3x3 stem (1 to 3; more would skip pixels). With 2, a 64 px input
    costs about what 32 px costs with 1, and the stem learns the downsampling a resize would do by averaging. The
    fast CPU recipe (augment.resize=64, stem_stride=2): +0.006 best valid AUROC at 300 s, 3 seeds (docs/benchmarks.md).
    """

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 1 <= self.width <= 4096:
            problems.append(f"width: must be in [1, 4096], got {self.width}")
        if not 1 <= len(self.depths) <= 8 or not all(1 <= d <= 64 for d in self.depths):
            problems.append(f"depths: 1 to 8 stages of 1 to 64 layers or blocks each, got {list(self.depths)}")
        if not 1 <= self.stem_stride <= 3:
            problems.append(f"stem_stride: must be in [1, 3], got {self.stem_stride}")
        elif self.stem_stride != 1 and self.name not in ("compact_cnn", "compact_resnet"):
            problems.append(f"stem_stride: is for compact_cnn and compact_resnet, not {self.name}; leave it at 1")
        if self.stem_init not in ("default", "whiten"):
            problems.append(f"stem_init: must be default or whiten, got {self.stem_init!r}")
        elif self.stem_init == "whiten":
            if self.name not in ("compact_cnn", "compact_resnet"):
                problems.append(f"stem_init: whiten is for compact_cnn and compact_resnet, not {self.name}")
            if self.init_from or self.pretrained:
                problems.append(
                    "stem_init: whiten starts the stem from the data, and init_from and pretrained give its weights; "
                    "give model.stem_init=default with them"
                )
        if self.init_from and self.pretrained:
            problems.append(
                f"init_from: {self.init_from} gives every weight, and pretrained: {self.pretrained} the backbone's; "
                "give one of them"
            )
        arch = architecture(self.name)
        if arch is None:
            close = difflib.get_close_matches(self.name, MODEL_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"name: unknown model {self.name!r}{hint}; known: {', '.join(MODEL_NAMES)}, timm/<name>")
            return problems
        if arch is _TIMM:
            try:
                timm_skeleton(self)
            except ModelError as e:
                problems.append(f"name: {e}")
                return problems
        elif self.kwargs:
            problems.append(f"kwargs: only timm models take keyword arguments, and {self.name} is not one")
        if arch.inputs == "embeddings" and self.pretrained:
            problems.append(f"pretrained: {self.name} starts from random weights (it is a head on embeddings)")
        if self.freeze not in freeze_choices(self):
            problems.append(
                f"freeze: {self.name} has no stage {self.freeze!r}; valid: {', '.join(freeze_choices(self))}"
            )
        if self.pretrained == "hub" and arch is not _TIMM:
            problems.append(f"pretrained: 'hub' (the local Hugging Face cache) is for timm models, not {self.name}")
        elif (
            self.pretrained and _is_weights_name(self.pretrained) and _weights_enum(self.name, self.pretrained) is None
        ):
            if arch is _TIMM:
                problems.append(
                    f"pretrained: {self.pretrained!r} is a torchvision weights name; a timm model takes 'hub' (its "
                    "weights from the local Hugging Face cache) or a file path"
                )
            elif arch.torchvision:
                known = ", ".join(["imagenet", *_weights_class(self.name).__members__])
                problems.append(
                    f"pretrained: {self.name} has no weights {self.pretrained!r}; known: {known}, or a file path"
                )
            else:
                problems.append(
                    f"pretrained: {self.name} has no torchvision weights; give a state dict file path or null"
                )
        return problems


# ---------------------------------------------------------------------------------------------
# The model


def whiten_stem_(model: Classifier, images: torch.Tensor, eps: float = 1e-2) -> None:
    """model.stem_init=whiten: the stem's k x k filters become +- the leading eigenvectors of the k x k patches of
    `images` (float (N, 3, H, W), as the network sees them), each divided by sqrt(eigenvalue + eps). The stem's
    outputs then start decorrelated, with unit variance along the patches' main directions (as in fast CIFAR-10
    training), instead of random mixtures dominated by brightness. Each direction comes with its negative so
    that the ReLU after the batch norm keeps both signs; with more than 2 x 3k^2 filters the rest keep their init.

    Deterministic: float64 on the CPU, the covariance summed in fixed chunks; every rank computes the same."""
    conv = model.net.stem[0]
    k = conv.kernel_size[0]
    dims = images.shape[1] * k * k
    chunk = max(1, (1 << 20) // max(1, (images.shape[2] - k + 1) * (images.shape[3] - k + 1)))
    total, outer, count = torch.zeros(dims, dtype=torch.float64), torch.zeros(dims, dims, dtype=torch.float64), 0
    for start in range(0, len(images), chunk):  # about 2**20 patches at a time: 200 MB in float64
        patches = nn.functional.unfold(images[start : start + chunk].double(), k).transpose(1, 2).reshape(-1, dims)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    eigenvalues, vectors = torch.linalg.eigh(outer / count - torch.outer(mean, mean))  # ascending
    n = min(conv.out_channels // 2, dims)
    filters = (vectors[:, -n:] / (eigenvalues[-n:].clamp_min(0) + eps).sqrt()).T.flip(0)  # largest first
    filters = filters.reshape(n, *conv.weight.shape[1:])
    with torch.no_grad():
        conv.weight[: 2 * n] = torch.cat([filters, -filters]).to(conv.weight.dtype)


class Head(nn.Sequential):
    """Dropout and the new Linear layer, computed in float32 even under autocast: bf16 logits have 8 bits
    of mantissa, so probabilities would come in coarse steps and tie in AUROC and threshold choice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


class DeterministicAdaptiveAvgPool2d(nn.Module):
    """AdaptiveAvgPool2d as two small matrix products: the same averages (the same windows), with a
    deterministic backward on CUDA, where AdaptiveAvgPool2d's (for outputs other than 1x1) has none."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)

    @staticmethod
    def _weights(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
        """(size_out, size_in): row i averages inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1."""
        weights = torch.zeros(size_out, size_in, dtype=like.dtype, device=like.device)
        for i in range(size_out):
            start, stop = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
            weights[i, start:stop] = 1.0 / (stop - start)
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_h, out_w = (o or s for o, s in zip(self.output_size, x.shape[-2:]))
        rows, cols = self._weights(x.shape[-2], out_h, x), self._weights(x.shape[-1], out_w, x)
        return torch.einsum("oh,nchw,pw->ncop", rows, x, cols)


def make_deterministic(model: nn.Module) -> nn.Module:
    """Replace the adaptive average pools that have no deterministic CUDA backward (all but 1x1 outputs)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size not in (1, (1, 1)):
            model.set_submodule(name, DeterministicAdaptiveAvgPool2d(module.output_size))
    return model


class Classifier(nn.Module):
    """A registry network with its new head; `train()` keeps frozen batch norms in eval mode."""

    def __init__(self, net: nn.Module, head_path: str):
        super().__init__()
        self.net = net
        self.head_path = head_path

    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(self.head_path)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head.parameters()}
        return [p for p in self.net.parameters() if id(p) not in head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            # Frozen = no parameter takes gradients. Decided here rather than remembered at build
            # time, so it still holds after convert_sync_batchnorm swaps the modules.
            for module in self.modules():
                params = list(module.parameters(recurse=False))
                if (
                    isinstance(module, nn.modules.batchnorm._BatchNorm)
                    and params
                    and not any(p.requires_grad for p in params)
                ):
                    module.eval()
        return self


def stage_parameters(net: nn.Module, path: str) -> list[nn.Parameter]:
    """The parameters a stage path names: a module's, or one parameter (a ViT's cls_token, pos_embed)."""
    try:
        return list(net.get_submodule(path).parameters())
    except AttributeError:
        return [net.get_parameter(path)]


def build_model(cfg: ModelConfig, num_classes: int, input_shape: tuple[int, ...] | None = None) -> Classifier:
    """The configured network with a new head of `num_outputs(num_classes)` logits, weights loaded, frozen as asked,
    for data of `input_shape` ((H, W, 3) images, (D,) embeddings: the manifest's image_shape; None: images)."""
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "model config")
    arch = architecture(cfg.name)
    embeddings = input_shape is not None and len(input_shape) == 1
    if embeddings and arch.inputs == "images":
        raise ModelError(
            f"model.name={cfg.name} takes images, and the data holds embeddings of {input_shape[0]} values (written "
            "by `histo-dist embed`): train linear_probe or mlp_probe on them"
        )
    if not embeddings and arch.inputs == "embeddings":
        raise ModelError(
            f"model.name={cfg.name} is a head on embeddings, and the data holds images"
            + (f" of {input_shape[1]}x{input_shape[0]}" if input_shape else "")
            + ": compute embeddings with `histo-dist embed` first, or choose an image model"
        )
    net = arch.build(cfg, None if input_shape is None else tuple(input_shape))
    head = arch.head_of(cfg)
    old_head = net.get_submodule(head)
    net.set_submodule(head, Head(nn.Dropout(cfg.dropout), nn.Linear(old_head.in_features, num_outputs(num_classes))))
    if cfg.pretrained and not arch.loads_weights:
        _load_backbone(net, cfg.name, cfg.pretrained)
    model = Classifier(net, head)
    if cfg.init_from:
        _init_from(model, cfg, num_classes)
    if cfg.freeze != "none" and not (cfg.pretrained or cfg.init_from):
        log.warning("model.freeze=%s with random weights: the frozen layers stay random", cfg.freeze)
    if cfg.freeze == "all":
        for p in model.backbone_parameters():
            p.requires_grad_(False)
    elif cfg.freeze != "none":
        stages = arch.stages_of(cfg)
        names = list(stages)
        for stage in names[: names.index(cfg.freeze) + 1]:
            for path in stages[stage]:
                for p in stage_parameters(net, path):
                    p.requires_grad_(False)
    return model.train()  # puts the norms just frozen in eval mode


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def _weights_class(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name)


def _weights_enum(name: str, pretrained: str) -> Any | None:
    """The torchvision weights `pretrained` names for model `name`, or None when it names none."""
    if not architecture(name).torchvision:
        return None
    weights = _weights_class(name)
    if pretrained.lower() == "imagenet":
        return weights.DEFAULT
    return weights.__members__.get(pretrained)


def hub_weights_path(weights: Any) -> Path:
    """Where torch hub caches a weights file (torchvision weights, or a URL): <torch.hub.get_dir()>/checkpoints/<file
    name of its URL>."""
    url = getattr(weights, "url", weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)


def _load_backbone(net: nn.Module, name: str, pretrained: str) -> None:
    weights = _weights_enum(name, pretrained)
    if weights is None:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelError(
                f"model.pretrained={pretrained!r}: no such file; give 'imagenet', a torchvision weights name "
                "(e.g. IMAGENET1K_V1) or the path of a state dict file"
            )
    else:
        path = hub_weights_path(weights)
        if not path.is_file():
            raise ModelError(
                f"model.pretrained={pretrained!r}: the {name} weights {weights.name} are not in the local torch hub "
                "cache, and histo-dist never downloads at run time. On a machine with network, fetch\n"
                f"  {weights.url}\nand put the file at\n  {path}\n"
                f"(e.g. curl -L --create-dirs -o {path} {weights.url}; the cache is $TORCH_HOME/hub, "
                "default ~/.cache/torch/hub), or set model.pretrained to the file's path."
            )
    head = ARCHITECTURES[name].head_of(None) + "."
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith(head)}
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(head)}
    # Files written before BatchNorm counted its batches lack num_batches_tracked; it only matters for momentum=None.
    mismatch = describe_mismatch(expected, state, optional=lambda k: k.endswith("num_batches_tracked"))
    if mismatch:
        raise ModelError(f"weights file {path} does not fit the {name} backbone: {mismatch}")
    net.load_state_dict(state, strict=False)  # strict on the backbone above; the head is new
    log.info("model %s: backbone weights loaded from %s", name, path)


def _init_from(model: Classifier, cfg: ModelConfig, num_classes: int) -> None:
    """model.init_from: every weight from a training checkpoint, which must fit the architecture exactly."""
    path = Path(cfg.init_from).expanduser()
    if not path.is_file():
        raise ModelError(
            f"model.init_from={cfg.init_from}: {'a folder' if path.is_dir() else 'no such file'}; give a training "
            "checkpoint such as RUN/checkpoints/best.pt"
        )
    state = read_training_checkpoint(path)
    weights, _ = model_weights(state, "model", path)
    mismatch = describe_mismatch(model.state_dict(), weights)
    if mismatch:
        saved = state["config"].get("model", {}) if isinstance(state["config"], dict) else {}
        raise ModelError(
            f"model.init_from={path}: its {saved.get('name', '?')} model for {state['num_classes']} classes does not "
            f"fit model.name={cfg.name} for {num_classes} classes: {mismatch}"
        )
    model.load_state_dict(weights)
    log.info(
        "model %s: weights from %s (step %s); optimizer and schedule start fresh", cfg.name, path, state.get("step")
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt, truncated or non-tensor file; torch and safetensors raise many types
        raise ModelError(f"cannot read weights file {path}: {type(e).__name__}: {e}") from e
    # Training checkpoints nest the model's state dict.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    # Training checkpoints hold our Classifier (net.), maybe once wrapped (module., _orig_mod.).
    state = strip_prefixes(state, (*WRAPPER_PREFIXES, "net."))
    return {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}


# Old torchvision DenseNet files spell `denselayer1.norm1.weight` as `denselayer1.norm.1.weight`
# (torchvision renames them the same way when it loads them itself).
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def describe_mismatch(
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    optional: Callable[[str], bool] = lambda key: False,
) -> str:
    """What keeps `state` from loading into a module whose state dict is `expected` ('' when it fits):
    missing keys (other than `optional` ones), unexpected keys, and shapes that differ."""
    missing = [k for k in expected if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    found = [
        (what, keys)
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
        if keys
    ]
    return "; ".join(
        f"{what} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}" for what, keys in found
    )
