"""Embedding throughput of `histo-dist embed`'s loop on this machine: read a shard, resize and normalise on the
device, forward the backbone, gather float16 vectors.

    python benchmarks/bench_embed.py [--models timm/vit_tiny_patch16_224,timm/vit_small_patch16_224]
                                     [--precision no,bf16] [--images 768] [--batch 64] [--device cpu|cuda]

Synthetic 96x96 patches in shards of 128 (learnable test images; the timing does not depend on content), a
randomly initialised backbone of each model (the weights do not change the time) with its own input: 224 px
for these ViTs, the 96 px patches resized on the device, as `histo-dist embed` does. One shard warms up, the
rest are timed with `embed.embed_shard` (what each rank runs per shard); prints images per second per model
and precision. On a GPU, `--device cuda --models timm/vit_large_patch16_224 --precision bf16 --batch 256`
gives the ViT-L/16 figure (the size of UNI, Virchow, H-optimus-0's ViT-g is larger still).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="timm/vit_tiny_patch16_224,timm/vit_small_patch16_224")
    parser.add_argument("--precision", default="no,bf16")
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from histo_dist.config import from_dict
    from histo_dist.embed import EmbedConfig, embed_shard, load_backbone
    from histo_dist.experiment import with_model_input
    from histo_dist.inference import autocast
    from histo_dist.manifest import Manifest
    from tests.shard_data import make_dataset

    tmp = Path(tempfile.mkdtemp())
    make_dataset(tmp / "images", {"train": [128] * (args.images // 128)}, shape=(96, 96, 3), learnable=True)
    manifest = Manifest.load(tmp / "images")
    shards = manifest.split("train").shards
    device = torch.device(args.device)
    print(
        f"{args.device} ({torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores), {len(shards) - 1} shards of 128 96x96 patches timed after one warm-up, "
        f"batch {args.batch}"
    )
    for name in args.models.split(","):
        for precision in args.precision.split(","):
            cfg = from_dict(
                EmbedConfig,
                {"data": str(manifest.root), "output": str(tmp / "out"), "batch_size": args.batch,
                 "mixed_precision": precision, "model": {"name": name}},
            )  # fmt: skip
            cfg.augment = with_model_input(cfg.augment, cfg.model, {})
            backbone = load_backbone(cfg, manifest, {"model"})
            backbone.model.to(device)
            context = autocast(device, precision)
            embed_shard(backbone, manifest, "train", shards[0], cfg, device, context)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for shard in shards[1:]:
                embed_shard(backbone, manifest, "train", shard, cfg, device, context)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            n = sum(s.num_samples for s in shards[1:])
            print(
                f"  {name} ({backbone.dim} values, {cfg.augment.resize} px input), {precision}: "
                f"{n / seconds:,.1f} img/s ({n} images in {seconds:.1f} s)"
            )


if __name__ == "__main__":
    main()
