"""Embeddings of image shards from a backbone, written as shards of the same manifest contract.

    histo-dist embed --data SHARDS --output EMBEDDINGS model.name=timm/vit_small_patch16_224 model.pretrained=hub
    histo-dist embed --data SHARDS --output EMBEDDINGS --checkpoint RUN/checkpoints/best.pt
    histo-dist embed --config backbone.yaml --data SHARDS --output EMBEDDINGS --mixed-precision bf16
    accelerate launch --multi_gpu --num_processes 2 -m histo_dist embed ...        (the same shards, 2 ranks)

An image's embedding is what the backbone hands its classification layer: a timm model's pooled
features (its forward without classifier), a checkpoint's head input (its EMA weights when the run
kept them). The backbone is a timm or registry model (the `model` section, given as key=value or
in --config YAML, with the `augment` section's crop, resize, mean and std: a timm model's own by
default), or one of our checkpoints with the input contract it was trained with.

EMBEDDINGS/{split}-NNNNNN.tar holds the embeddings of SHARDS/{split}-NNNNNN.tar: the same keys and
labels in the same order, each a float16 vector of D values (`manifest.py`); EMBEDDINGS/manifest.json,
written last, records the data (and its manifest's sha256) and the backbone. `histo-dist verify`
checks them, `histo-dist train` trains heads on them (linear_probe, mlp_probe).

Ranks share the work by shards: rank 0 lists the shards not yet embedded and every rank takes every
N-th of them. A shard is written atomically when all its samples are embedded, so a killed run
leaves complete shards only; the same command again keeps them (checked against the plan saved in
`.embed-plan.json`) and embeds the rest. Batches never straddle two shards, so a shard's bytes do
not depend on the number of ranks or on where a run was interrupted (same hardware, same threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from histo_dist import __version__
from histo_dist.allocator import keep_freed_memory
from histo_dist.augment import AugmentConfig
from histo_dist.errors import HistoDistError
from histo_dist.manifest import MANIFEST_NAME, Manifest, ShardInfo, SplitInfo
from histo_dist.models import ModelConfig

log = logging.getLogger(__name__)
PLAN_NAME = ".embed-plan.json"


class EmbedError(HistoDistError):
    """Embeddings that cannot be computed or written as asked."""


@dataclass
class EmbedOptions:
    data: str = ""
    """Shard folder (manifest.json) of the images, written by `histo-dist convert`."""
    output: str = ""
    """Folder for the embedding shards and their manifest.json."""
    splits: str = ""
    """Comma-separated splits to embed (default: every split of the data)."""
    checkpoint: str = ""
    """A checkpoint of `histo-dist train` to embed with (the input of its classification layer); without it, the
    model section (model.name=..., key=value or in --config) is the backbone."""
    weights: Literal["auto", "model", "ema"] = "auto"
    """--checkpoint: which weights ('auto' takes the EMA average when the run kept one)."""
    resize: bool = False
    """--checkpoint: resize images of another size than it was trained on (bilinear, antialiased)."""
    batch_size: int = 256
    """Images per forward pass on each rank."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision of the forward passes (bf16 on GPUs and on CPUs with AMX/AVX512-BF16)."""
    seed: int = 0
    """Seed of a randomly initialised backbone's weights (model.pretrained null): the same on every rank."""
    cpu: bool = False
    """Run on the CPU even when a GPU is present."""
    cpu_keep_freed_memory: bool = True
    """On the CPU, keep the memory PyTorch frees in the process (glibc's malloc), as train.cpu_keep_freed_memory does
    for training and --cpu-keep-freed-memory for evaluate. Off where memory is tighter than time."""
    overwrite: bool = False
    """Replace the embeddings already in --output (from another backbone or data, or finished)."""
    progress: bool = True
    """Show a progress bar (rank 0)."""


@dataclass
class EmbedConfig(EmbedOptions):
    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone when no --checkpoint is given (its classification layer is not used)."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """The input without --checkpoint: crop, resize, mean and std (a timm model's own size and normalisation
    unless given); augmentation itself is not applied."""

    def validate(self) -> list[str]:
        problems = [f"{name}: required" for name in ("data", "output") if not getattr(self, name)]
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            problems.append(f"seed: must be in [0, 2**63), got {self.seed}")
        return problems

    @property
    def split_list(self) -> list[str]:
        return [s.strip() for s in self.splits.split(",") if s.strip()]


@dataclass
class Backbone:
    """A model that maps uint8 images to embeddings: `inputs()` as its InferenceModel takes them, `net` without
    its classification layer."""

    model: Any
    """The `inference.InferenceModel` whose head was replaced by the identity."""
    dim: int
    identity: dict[str, Any]
    """What the backbone is, for the manifest and the plan of a resumed run."""


def load_backbone(cfg: EmbedConfig, manifest: Manifest, sections: set[str]) -> Backbone:
    """The backbone of `cfg` for images of `manifest`, its head removed; errors name what is wrong. `sections`: the
    sections (model, augment) the user gave."""
    from histo_dist.inference import InferenceModel, check_data, load_inference_model
    from histo_dist.models import build_model, check_input_side

    where = str(manifest.root / MANIFEST_NAME)
    if cfg.checkpoint:
        if sections:
            raise EmbedError(
                f"--checkpoint {cfg.checkpoint} brings its own model and input; drop the "
                f"{' and '.join(sorted(sections))} values, or drop --checkpoint"
            )
        model = load_inference_model(cfg.checkpoint, cfg.weights)
        if len(model.image_shape) == 1:
            raise EmbedError(
                f"--checkpoint {cfg.checkpoint}: a {model.model_name} is a head on embeddings and has no backbone; "
                "embed with a checkpoint of an image model"
            )
        check_data(model, manifest.image_shape, where, cfg.resize)
        identity = {"checkpoint": str(Path(cfg.checkpoint).resolve()), "step": model.step, "weights": model.weights}
    else:
        if "model" not in sections:
            raise EmbedError(
                "no backbone: give --checkpoint RUN/checkpoints/best.pt, or model.name=... (e.g. "
                "model.name=timm/vit_small_patch16_224 model.pretrained=hub)"
            )
        height = manifest.image_shape[0]
        check_input_side(cfg.model, cfg.augment.resize or cfg.augment.crop or height, where)
        torch.manual_seed(cfg.seed)  # a random backbone is the same on every rank
        net = build_model(cfg.model, manifest.num_classes, manifest.image_shape)
        model = InferenceModel(
            net.eval(),
            manifest.num_classes,
            manifest.label_names,
            manifest.image_shape,
            cfg.augment,
            channels_last=True,
            model_name=cfg.model.name,
        )
        identity = {"model": dataclasses.asdict(cfg.model), "seed": None if cfg.model.pretrained else cfg.seed}
    a = model.augment
    identity["input"] = {"crop": a.crop, "resize": a.resize, "mean": list(a.mean), "std": list(a.std)}
    classifier = model.model
    dim = classifier.head[-1].in_features
    classifier.net.set_submodule(classifier.head_path, nn.Identity())
    return Backbone(model, dim, {"backbone": model.model_name, **identity})


def embed_shard(
    backbone: Backbone, manifest: Manifest, split: str, shard: ShardInfo, cfg: EmbedConfig, device, autocast
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(keys, labels, float16 embeddings) of one shard's samples, in the shard's order."""
    from histo_dist.loader import LoaderConfig, ShardLoader

    one = dataclasses.replace(
        manifest, splits={split: SplitInfo(shard.num_samples, shard.class_counts, False, (shard,))}
    )
    loader = ShardLoader(
        one, split, LoaderConfig(eval_batch_size=cfg.batch_size, num_workers=0), training=False, device_type=device.type
    )
    keys, labels, vectors = [], [], []
    model = backbone.model
    with torch.inference_mode():
        for batch in loader:
            x = model.inputs(batch["image"].to(device, non_blocking=True), cfg.resize, str(manifest.root / shard.name))
            with autocast():
                features = model.model(x)
            vectors.append(features.float().cpu())
            keys += batch["key"]
            labels.append(batch["label"])
    embeddings = torch.cat(vectors)
    if embeddings.shape != (shard.num_samples, backbone.dim):
        raise EmbedError(
            f"{manifest.root / shard.name}: embeddings of shape {tuple(embeddings.shape)}, expected "
            f"({shard.num_samples}, {backbone.dim})"
        )
    half = embeddings.half()
    bad = ~torch.isfinite(half).all(1)
    if bad.any():
        raise EmbedError(
            f"{manifest.root / shard.name}: the embedding of {keys[int(bad.nonzero()[0])]} (and {int(bad.sum()) - 1} "
            f"more) holds NaN or values beyond float16's range (largest |value| {float(embeddings.abs().max()):.3g}); "
            "a backbone giving such features cannot be stored as float16 embeddings"
        )
    return keys, torch.cat(labels), half


@dataclass
class EmbedReport:
    out: Path
    manifest: Manifest
    embedded: int
    """Images embedded by this call, all ranks (the others were kept from an interrupted run)."""
    seconds: float
    main: bool
    """On the main process (which prints the summary)."""

    def summary(self) -> str:
        m = self.manifest
        return (
            f"embeddings of {m.total_samples} images ({', '.join(m.splits)}; {self.embedded} embedded now in "
            f"{self.seconds:.1f} s, {self.embedded / max(self.seconds, 1e-9):.0f} img/s), {m.image_shape[0]} float16 "
            f"values each, from {m.source['backbone']} -> {self.out / MANIFEST_NAME}"
        )


def embed(cfg: EmbedConfig, sections: set[str] = frozenset({"model"}), accelerator=None) -> EmbedReport:
    """Embed the splits (every rank calls this); the main process writes the manifest last. `sections`: the
    config sections the user gave (model, augment)."""
    from accelerate import Accelerator

    from histo_dist.config import ConfigError
    from histo_dist.files import sha256_file

    problems = cfg.validate()
    if problems:
        raise ConfigError(problems, "embed options")
    t0 = time.perf_counter()
    manifest = Manifest.load(cfg.data)
    if manifest.embeddings:
        raise EmbedError(f"--data {cfg.data}: holds embeddings already; give a folder of image shards")
    splits = list(dict.fromkeys(cfg.split_list)) or list(manifest.splits)
    jobs = [(split, shard) for split in splits for shard in manifest.split(split).shards]
    backbone = load_backbone(cfg, manifest, set(sections))
    out = Path(cfg.output)
    plan = {  # as JSON gives it back (lists, not tuples): compared with the plan a killed run saved
        "created_by": f"histo-dist {__version__}",
        "data": str(manifest.root.resolve()),
        "data_manifest_sha256": sha256_file(manifest.root / MANIFEST_NAME),
        **backbone.identity,
        "mixed_precision": cfg.mixed_precision,
        "resize": cfg.resize,
        "splits": splits,
        "shards": [shard.name for _, shard in jobs],
    }
    plan = json.loads(json.dumps(plan))

    own = accelerator is None
    acc = accelerator or Accelerator(cpu=cfg.cpu or not torch.cuda.is_available())
    if own and acc.device.type == "cpu" and cfg.cpu_keep_freed_memory:
        keep_freed_memory()
    try:
        return _embed(cfg, manifest, splits, jobs, backbone, out, plan, acc, t0)
    finally:
        if own:
            acc.end_training()


def _embed(cfg, manifest, splits, jobs, backbone, out, plan, acc, t0) -> EmbedReport:
    from accelerate.utils import broadcast_object_list
    from tqdm import tqdm

    from histo_dist.inference import autocast
    from histo_dist.shards import write_shard

    todo: list = [None]
    if acc.is_main_process:
        try:
            todo = [_start(out, plan, cfg.overwrite)]
        except HistoDistError as e:  # every rank raises it: none may wait for the others forever
            todo = [e]
    broadcast_object_list(todo)
    if isinstance(todo[0], HistoDistError):
        raise todo[0]
    mine = [(split, shard) for split, shard in jobs if shard.name in todo[0]][acc.process_index :: acc.num_processes]
    device = acc.device
    backbone.model.to(device)
    total = sum(shard.num_samples for _, shard in mine)
    bar = tqdm(total=total, unit="img", desc=f"embed -> {out}", disable=not (cfg.progress and acc.is_main_process))
    for split, shard in mine:
        keys, labels, vectors = embed_shard(
            backbone, manifest, split, shard, cfg, device, autocast(device, cfg.mixed_precision)
        )
        write_shard(out / shard.name, keys, vectors.numpy(), labels.numpy(), None, "npy", manifest.num_classes)
        bar.update(shard.num_samples)
    bar.close()
    acc.wait_for_everyone()

    result: list = [None]
    if acc.is_main_process:
        try:
            result = [_finish(out, manifest, splits, backbone, plan)]
        except HistoDistError as e:
            result = [e]
    broadcast_object_list(result)
    if isinstance(result[0], HistoDistError):
        raise result[0]
    embedded = sum(shard.num_samples for _, shard in jobs if shard.name in todo[0])
    return EmbedReport(out, Manifest.load(out), embedded, time.perf_counter() - t0, acc.is_main_process)


def _start(out: Path, plan: dict[str, Any], overwrite: bool) -> list[str]:
    """(Main process.) Make `out` ready: refuse a finished folder or another backbone's shards unless overwrite,
    keep the complete shards of an interrupted run of this plan; return the names of the shards to embed."""
    from histo_dist.convert import refuse_finished, remove_previous, resumable_shards
    from histo_dist.files import write_atomic
    from histo_dist.sources import remove_files

    refuse_finished(out, overwrite)
    if overwrite:
        remove_previous(out, keep=out)
    done = resumable_shards(out, plan, overwrite, PLAN_NAME, "embedding")
    write_atomic(out / PLAN_NAME, json.dumps(plan, indent=1).encode())
    remove_files(list(out.glob(".*.partial")))  # temp files of a killed run
    if done:
        log.info("%s: keeping %d shard(s) embedded by an interrupted run", out, len(done))
    return [name for name in plan["shards"] if name not in done]


def _finish(out: Path, manifest: Manifest, splits: list[str], backbone: Backbone, plan: dict) -> None:
    """(Main process.) Check every shard against its image shard, then write the manifest (last)."""
    from histo_dist.shards import read_shard_info
    from histo_dist.sources import remove_files

    new_splits = {}
    for split in splits:
        info = manifest.split(split)
        shards = tuple(read_shard_info(out / shard.name, manifest.num_classes) for shard in info.shards)
        for source, shard in zip(info.shards, shards):
            if (shard.num_samples, shard.class_counts) != (source.num_samples, source.class_counts):
                raise EmbedError(
                    f"{out / shard.name}: {shard.num_samples} embeddings with class counts {list(shard.class_counts)}, "
                    f"the image shard has {source.num_samples} with {list(source.class_counts)}"
                )
        new_splits[split] = SplitInfo(info.num_samples, info.class_counts, info.shuffled, shards)
    source = {"format": "embeddings", **{k: v for k, v in plan.items() if k not in ("created_by", "shards")}}
    Manifest(
        codec="npy",
        image_shape=(backbone.dim,),
        label_names=manifest.label_names,
        splits=new_splits,
        source=source,
        samples_per_shard=manifest.samples_per_shard,
        shuffle_seed=manifest.shuffle_seed,
        created_by=f"histo-dist {__version__}",
        root=out,
        dtype="float16",
    ).save(out)
    remove_files([out / PLAN_NAME])


# ---------------------------------------------------------------------------------------------
# Command line


def configure(parser: argparse.ArgumentParser) -> None:
    from histo_dist.config import add_dataclass_arguments

    parser.add_argument("--config", help="YAML with the model and augment sections (and any option below)")
    add_dataclass_arguments(parser, EmbedOptions)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="model and augment values, e.g. model.name=timm/vit_small_patch16_224 model.pretrained=hub "
        "model.kwargs.init_values=1e-5 (`histo-dist train --help-config model` lists them)",
    )


def run(args: argparse.Namespace) -> int:
    from histo_dist.config import deep_merge, from_dict, read_config_data
    from histo_dist.experiment import with_model_input

    data, source = read_config_data(args.config, args.overrides)
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(EmbedOptions) if hasattr(args, f.name)}
    data = deep_merge(data, flags)
    cfg = from_dict(EmbedConfig, data, source or "command line")
    cfg.augment = with_model_input(cfg.augment, cfg.model, data.get("augment"))
    report = embed(cfg, sections={"model", "augment"} & set(data))
    if report.main:
        print(report.summary())
    return 0
