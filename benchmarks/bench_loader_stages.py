"""Where the loader's time per sample goes: each stage of the training path timed on its own.

    python benchmarks/bench_loader_stages.py SHARD_FOLDER   (e.g. /tmp/bench-loader/shards-4x,
                                                            which bench_loader.py leaves behind)

Stages, each including the ones before: map every shard (mmap with MAP_POPULATE); index its
samples (`index_shard`: tar headers, checked with numpy); prepare it for reading (labels, .npy
header checks); the full in-process ShardLoader (shuffle windows, batches copied out of the
mappings, seeds). Then, apart: mapping plus the header-by-header walk that irregular shards use.
Best of 3 passes over the split's shards, warm page cache; the raw read of the same files is
printed for scale.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histo_dist.loader import LoaderConfig, ShardLoader, _OpenShard  # noqa: E402
from histo_dist.manifest import Manifest  # noqa: E402
from histo_dist.shards import _index_walk, index_shard, load_shard  # noqa: E402


def main() -> None:
    manifest = Manifest.load(sys.argv[1])
    files = [str(f) for f in manifest.shard_paths("train")]
    total = manifest.split("train").num_samples
    shape = tuple(manifest.image_shape)
    for f in files:
        Path(f).read_bytes()  # warm the page cache

    block = bytearray(1 << 22)

    def raw():
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(block):
                    pass
        return total

    def mapped():
        for f in files:
            load_shard(f)  # mapped, populated, and unmapped again when the array goes
        return total

    def indexed():
        return sum(len(index_shard(load_shard(f), f)) for f in files)

    def walked():  # the fallback for irregular layouts, instead of the vectorised index
        return sum(len(_index_walk(load_shard(f), f, None)) for f in files)

    def prepared():
        return sum(len(_OpenShard(index_shard(load_shard(f), f), manifest.codec, shape).labels) for f in files)

    def full():
        loader = ShardLoader(manifest, "train", LoaderConfig(batch_size=256, num_workers=0), seed=0)
        return sum(len(b["label"]) for b in loader)

    print(f"loader stages on {total} training samples, {len(files)} shards")
    previous = 0.0
    for name, fn in (
        ("raw read (for scale)", raw),
        ("map shards (MAP_POPULATE)", mapped),
        ("+ index samples", indexed),
        ("+ labels, .npy header checks", prepared),
        ("full loader (windows, batches)", full),
        ("(map + header walk, the fallback)", walked),
    ):
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            n = fn()
            best = max(best, n / (time.perf_counter() - t))
        us = 1e6 / best
        step = f"(+{us - previous:4.1f})" if previous and fn is not walked else ""
        print(f"  {name:<34} {best:>9.0f} img/s  {us:5.1f} us/sample  {step}")
        previous = 0.0 if fn is raw else us


if __name__ == "__main__":
    main()
