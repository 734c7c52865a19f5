"""Where the loader's time per sample goes: each stage of the training path timed on its own.

    python benchmarks/bench_loader_stages.py SHARD_FOLDER   (e.g. /tmp/bench-loader/shards-4x,
                                                            which bench_loader.py leaves behind)

Stages, each including the ones before: parse tar headers over the mmap; copy each sample out of
the mapping; generator + reservoir shuffle buffer (4,096); the full in-process ShardLoader (batch
assembly, seeds). Best of 3 passes over the split's shards, warm page cache.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histo_dist.loader import LoaderConfig, ShardLoader, shuffle_buffer  # noqa: E402
from histo_dist.manifest import Manifest  # noqa: E402
from histo_dist.shards import iter_raw_samples_mmap  # noqa: E402


def main() -> None:
    manifest = Manifest.load(sys.argv[1])
    files = manifest.shard_paths("train")
    for f in files:
        f.read_bytes()  # warm the page cache

    def parse():
        return sum(1 for f in files for _ in iter_raw_samples_mmap(f))

    def copied():
        for f in files:
            for i, s in enumerate(iter_raw_samples_mmap(f)):
                members = {k: bytes(v) for k, v in s.members.items() if k != "json"}
                yield i, s.key, members.get("cls"), members, f

    def parse_copy():
        return sum(1 for _ in copied())

    def parse_copy_buffer():
        return sum(1 for _ in shuffle_buffer(copied(), 4096, np.random.default_rng(0)))

    def full():
        loader = ShardLoader(manifest, "train", LoaderConfig(batch_size=256, num_workers=0), seed=0)
        return sum(len(b["label"]) for b in loader)

    print(f"loader stages on {manifest.split('train').num_samples} training samples, {len(files)} shards")
    previous = 0.0
    for name, fn in (("parse tar headers (mmap)", parse), ("+ copy out of the mapping", parse_copy),
                     ("+ generator and shuffle buffer", parse_copy_buffer), ("full loader (batches, seeds)", full)):
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            n = fn()
            best = max(best, n / (time.perf_counter() - t))
        us = 1e6 / best
        print(f"  {name:<34} {best:>9.0f} img/s  {us:5.1f} us/sample  (+{us - previous:4.1f})")
        previous = us


if __name__ == "__main__":
    main()
