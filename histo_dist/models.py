"""Models by name: a small CNN and torchvision backbones with a new classification head.

`build_model(cfg, num_classes)` returns a `Classifier`: the registry network (`.net`, keeping the
torchvision module names so ImageNet state dicts load as they are) whose final Linear is replaced
by `Dropout -> Linear(num_outputs)`. Binary tasks get ONE logit (trained with BCEWithLogitsLoss),
others one logit per class.

Transfer learning:
- `pretrained` loads backbone weights, never over the network: "imagenet" (or a torchvision weights
  name) from the local torch hub cache, or a state dict file. The head is always freshly initialised.
- `freeze` stops gradients for the whole backbone ("all") or for every stage up to and including a
  named one; `Classifier.train()` keeps frozen batch norms in eval mode so their running statistics
  stay those of the pretrained weights.
- `head_parameters()` / `backbone_parameters()` let the optimizer give the backbone a lower lr.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    Global average pooling and a Linear layer; any input size."""

    def __init__(self, width: int, depths: tuple[int, ...], residual: bool, num_classes: int = 1000):
        super().__init__()
        self.stem = _conv_bn_relu(3, width)
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
    head: str
    """Dotted path of the final Linear in `build()`'s network; build_model replaces it."""
    stages: dict[str, tuple[str, ...]] | Callable[[ModelConfig], dict[str, tuple[str, ...]]]
    """Stage name -> dotted module paths, in forward order; together they hold every backbone parameter (or a
    function of the model config giving them)."""
    build: Callable[[ModelConfig], nn.Module]
    """A randomly initialised network of the model config (never downloads)."""
    torchvision: bool = True
    """Has torchvision weights (resolved by the registry name)."""

    def stages_of(self, cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
        return self.stages(cfg) if callable(self.stages) else self.stages


def _torchvision(name: str) -> Callable[[ModelConfig], nn.Module]:
    def build(cfg: ModelConfig) -> nn.Module:
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
        build=lambda cfg: SimpleCNN(),
        torchvision=False,
    ),
    "compact_cnn": Architecture(
        head="fc",
        stages=_compact_stages,
        build=lambda cfg: CompactCNN(cfg.width, cfg.depths, residual=False),
        torchvision=False,
    ),
    "compact_resnet": Architecture(
        head="fc",
        stages=_compact_stages,
        build=lambda cfg: CompactCNN(cfg.width, cfg.depths, residual=True),
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
}
MODEL_NAMES = tuple(ARCHITECTURES)


def _is_weights_name(pretrained: str) -> bool:
    """Spelled like torchvision weights (imagenet, IMAGENET1K_V2, DEFAULT): never taken for a file path,
    so a misspelt name is reported as such rather than as a missing file."""
    return pretrained.lower() == "imagenet" or re.fullmatch(r"[A-Z0-9_]+", pretrained) is not None


def freeze_choices(cfg: ModelConfig) -> tuple[str, ...]:
    return ("none", "all", *ARCHITECTURES[cfg.name].stages_of(cfg))


def num_outputs(num_classes: int) -> int:
    """Logits per sample: 1 for binary tasks (BCEWithLogitsLoss), else one per class."""
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
    return 1 if num_classes == 2 else num_classes


@dataclass
class ModelConfig:
    name: str = "simple_cnn"
    """Architecture: simple_cnn, compact_cnn, compact_resnet, resnet18, resnet34, resnet50, densenet121, vgg16_bn,
    efficientnet_b0, convnext_tiny."""
    pretrained: str | None = None
    """Backbone weights: null = random init; "imagenet" (or a torchvision weights name such as IMAGENET1K_V1) = from the
    local torch hub cache, never downloaded; else the path of a state dict file (torch.load or .safetensors)."""
    init_from: str | None = None
    """A training checkpoint (RUN/checkpoints/best.pt or step-*.pt) whose model weights, head included, start this
    run (its trained weights, not its EMA average); optimizer, schedule and data order start fresh. The way to go on
    training with values a resume refuses to change (learning rate, batch size, ranks, epochs...): a new run dir."""
    freeze: str = "none"
    """Frozen part: none, all (train only the new head), or a stage name freezing the stem up to and including it
    (resnets: stem, layer1..layer4)."""
    dropout: float = 0.0
    """Dropout right before the new classification layer (on top of any the architecture has)."""
    width: int = 32
    """compact_cnn, compact_resnet: channels of the first stage (doubled at each stage after it, at most 16x)."""
    depths: tuple[int, ...] = (1, 1, 1, 1)
    """compact_cnn, compact_resnet: conv layers (compact_cnn) or residual blocks (compact_resnet) of each stage; each
    stage after the first halves the resolution."""

    def validate(self) -> list[str]:
        problems = []
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if not 1 <= self.width <= 4096:
            problems.append(f"width: must be in [1, 4096], got {self.width}")
        if not 1 <= len(self.depths) <= 8 or not all(1 <= d <= 64 for d in self.depths):
            problems.append(f"depths: 1 to 8 stages of 1 to 64 layers or blocks each, got {list(self.depths)}")
        if self.init_from and self.pretrained:
            problems.append(
                f"init_from: {self.init_from} gives every weight, and pretrained: {self.pretrained} the backbone's; "
                "give one of them"
            )
        if self.name not in ARCHITECTURES:
            close = difflib.get_close_matches(self.name, MODEL_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"name: unknown model {self.name!r}{hint}; known: {', '.join(MODEL_NAMES)}")
            return problems
        if self.freeze not in freeze_choices(self):
            problems.append(
                f"freeze: {self.name} has no stage {self.freeze!r}; valid: {', '.join(freeze_choices(self))}"
            )
        if self.pretrained and _is_weights_name(self.pretrained) and _weights_enum(self.name, self.pretrained) is None:
            if ARCHITECTURES[self.name].torchvision:
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

    def __init__(self, name: str, net: nn.Module):
        super().__init__()
        self.arch_name = name
        self.net = net

    @property
    def head(self) -> nn.Module:
        return self.net.get_submodule(ARCHITECTURES[self.arch_name].head)

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


def build_model(cfg: ModelConfig, num_classes: int) -> Classifier:
    """The configured network with a new head of `num_outputs(num_classes)` logits, weights loaded, frozen as asked."""
    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "model config")
    arch = ARCHITECTURES[cfg.name]
    net = arch.build(cfg)
    old_head = net.get_submodule(arch.head)
    net.set_submodule(
        arch.head, Head(nn.Dropout(cfg.dropout), nn.Linear(old_head.in_features, num_outputs(num_classes)))
    )
    if cfg.pretrained:
        _load_backbone(net, cfg.name, cfg.pretrained)
    model = Classifier(cfg.name, net)
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
                net.get_submodule(path).requires_grad_(False)
    return model.train()  # puts the norms just frozen in eval mode


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def _weights_class(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name)


def _weights_enum(name: str, pretrained: str) -> Any | None:
    """The torchvision weights `pretrained` names for model `name`, or None when it names none."""
    if not ARCHITECTURES[name].torchvision:
        return None
    weights = _weights_class(name)
    if pretrained.lower() == "imagenet":
        return weights.DEFAULT
    return weights.__members__.get(pretrained)


def hub_weights_path(weights: Any) -> Path:
    """Where torch hub caches a torchvision weights file: <torch.hub.get_dir()>/checkpoints/<file name of its URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(weights.url).path)


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
    head = ARCHITECTURES[name].head + "."
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
