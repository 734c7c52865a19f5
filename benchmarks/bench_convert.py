"""Benchmark `histo-dist convert` per codec: conversion rate, shard bytes per image, decode time.

Makes a synthetic PCam-layout set of N patches (H&E-like, from `histo_dist.synth` when present,
else blurred noise) in a temp folder, converts it with each codec and each `--workers` count, and
prints one row per run:

    dataset  codec  workers  images/s (convert)  bytes/image (shards)  decode us/image

Decode time is `histo_dist.shards.decode_image` on the image bytes of the first shard (bytes
already in memory: the codec's cost, not the disk's). When ../shared/data/pcam-real-2k exists it
is converted too: real tissue compresses differently from synthetic.

    .venv/bin/python benchmarks/bench_convert.py [--n 8192] [--workers 1,2] [--codecs npy,png,jpeg]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from histo_dist.config import from_dict  # noqa: E402
from histo_dist.convert import ConvertConfig, convert  # noqa: E402
from histo_dist.manifest import CODEC_EXTENSIONS, Manifest  # noqa: E402
from histo_dist.shards import decode_image, iter_raw_samples  # noqa: E402

REAL = REPO.parent / "shared" / "data" / "pcam-real-2k"


def make_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(x uint8 (n,96,96,3), y uint8 (n,), how they were made)."""
    rng = np.random.default_rng(seed)
    try:
        from histo_dist.synth import make_patches
    except ImportError:
        make_patches = None
    if make_patches is not None:
        x, y, _ = make_patches(n, rng)
        return x, y.astype(np.uint8), "histo_dist.synth"
    # Fallback: pink/purple blobs (upsampled coarse noise), a little blur, sensor noise.
    from PIL import Image, ImageFilter

    coarse = rng.uniform(0, 1, size=(n, 12, 12, 3))
    base = np.array([225, 150, 200]) - coarse * np.array([100, 110, 60])
    x = np.empty((n, 96, 96, 3), np.uint8)
    for i in range(n):
        im = (
            Image.fromarray(base[i].astype(np.uint8))
            .resize((96, 96), Image.BICUBIC)
            .filter(ImageFilter.GaussianBlur(1))
        )
        x[i] = np.clip(np.asarray(im) + rng.normal(0, 4, (96, 96, 3)), 0, 255)
    return x, rng.integers(0, 2, n).astype(np.uint8), "blurred noise"


def write_pcam_train(folder: Path, x: np.ndarray, y: np.ndarray) -> None:
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "camelyonpatch_level_2_split_train_x.h5", "w") as f:
        f.create_dataset("x", data=x)
    with h5py.File(folder / "camelyonpatch_level_2_split_train_y.h5", "w") as f:
        f.create_dataset("y", data=y.reshape(-1, 1, 1, 1))


def decode_us(manifest: Manifest, limit: int = 2048) -> float:
    """Mean microseconds per `decode_image` call over the images of the first shard."""
    ext = CODEC_EXTENSIONS[manifest.codec]
    first = next(iter(manifest.splits.values())).shards[0]
    blobs = [s.members[ext] for s in iter_raw_samples(manifest.root / first.name)][:limit]
    shape = tuple(manifest.image_shape)
    decode_image(blobs[0], manifest.codec, shape)  # warm-up (imports, header cache)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for b in blobs:
            decode_image(b, manifest.codec, shape)
        best = min(best, (time.perf_counter() - t0) / len(blobs))
    return best * 1e6


def bench(name: str, src: Path, out: Path, codec: str, workers: int, splits: str, samples_per_shard: int) -> dict:
    cfg = from_dict(
        ConvertConfig,
        {
            "input": str(src),
            "output": str(out),
            "codec": codec,
            "workers": workers,
            "splits": splits,
            "samples_per_shard": samples_per_shard,
            "overwrite": True,
            "progress": False,
        },
    )
    t0 = time.perf_counter()
    manifest = convert(cfg).manifest
    seconds = time.perf_counter() - t0
    n = manifest.total_samples
    shard_bytes = sum(sh.bytes for s in manifest.splits.values() for sh in s.shards)
    row = {
        "dataset": name,
        "codec": codec,
        "workers": workers,
        "n": n,
        "img_s": n / seconds,
        "bytes": shard_bytes / n,
        "decode_us": decode_us(manifest),
    }
    shutil.rmtree(out)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192, help="synthetic images (default 8192)")
    parser.add_argument("--workers", default="1,2", help="comma-separated --workers values (default 1,2)")
    parser.add_argument("--codecs", default="npy,png,jpeg", help="comma-separated codecs (default npy,png,jpeg)")
    parser.add_argument("--samples-per-shard", type=int, default=1024)
    parser.add_argument("--real", default=str(REAL), help="real PCam folder to convert too ('' to skip)")
    parser.add_argument("--tmp", default=None, help="folder for the temp data (default: system temp)")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    codecs = args.codecs.split(",")

    import webdataset  # noqa: F401  (imports torch: pay it before timing the in-process workers=1 runs)

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench-convert-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        x, y, how = make_images(args.n)
        write_pcam_train(tmp / "synth", x, y)
        print(
            f"made {args.n} synthetic patches ({how}) in {time.perf_counter() - t0:.1f} s; "
            f"raw {x.nbytes / args.n:.0f} bytes/image; {os.cpu_count()} CPU(s)",
            flush=True,
        )
        del x
        sets = [("synth", tmp / "synth", "train")]
        if args.real and (Path(args.real) / "camelyonpatch_level_2_split_train_x.h5").exists():
            sets.append(("pcam-real-2k", Path(args.real), "train,valid,test"))
        for name, src, splits in sets:
            for codec in codecs:
                for w in workers:
                    row = bench(name, src, tmp / "out", codec, w, splits, args.samples_per_shard)
                    rows.append(row)
                    print(f"  done {name} {codec} workers={w}", flush=True)

    header = (
        f"{'dataset':<14}{'codec':<7}{'workers':>8}{'images':>8}{'convert img/s':>15}{'bytes/image':>13}"
        f"{'decode us/img':>15}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['dataset']:<14}{r['codec']:<7}{r['workers']:>8}{r['n']:>8}{r['img_s']:>15.0f}{r['bytes']:>13.0f}{r['decode_us']:>15.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
