"""Small shard datasets for tests, written with the real shard writer and manifest.

Images encode their own sample index (channels 0/1 of the top-left pixel) so tests can check that
labels stay attached; with `learnable=True`, positives carry a bright centre square (a learnable,
noisy signal) so short training runs beat chance.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from histo_dist.manifest import Manifest, SplitInfo, sample_key, shard_name
from histo_dist.shards import write_shard


def global_steps(rank_loaders, accumulation: int) -> list[list[str]]:
    """The keys each optimizer step of the rest of the epoch trains on, all ranks' loaders together (sorted
    within a step); asserts that every rank takes the same number of steps."""
    per_rank = []
    for loader in rank_loaders:
        micro = [b["key"] for b in loader]
        per_rank.append([sum(micro[i : i + accumulation], []) for i in range(0, len(micro), accumulation)])
    assert len({len(steps) for steps in per_rank}) == 1  # equal steps on every rank
    return [sorted(sum(step, [])) for step in zip(*per_rank)]


def label_of(index: int) -> int:
    return (index * 7 + 3) % 3 % 2


def encoded_image(index: int, shape=(8, 8, 3), learnable: bool = False) -> np.ndarray:
    rng = np.random.default_rng(index)
    image = rng.integers(60, 140, size=shape, dtype=np.uint8) if learnable else np.empty(shape, np.uint8)
    label = label_of(index)
    if learnable:
        h, w = shape[0] // 4, shape[1] // 4
        if label:
            image[h : 3 * h, w : 3 * w] += np.uint8(rng.integers(40, 100))
    else:
        image[..., 2] = label * 200
    image[0, 0, 0], image[0, 0, 1] = index % 256, index // 256
    return image


def make_dataset(
    root: Path,
    sizes: dict[str, list[int]],
    shape=(8, 8, 3),
    learnable: bool = False,
    label_fn=label_of,
    image_fn=None,
    label_names=("negative", "positive"),
) -> Manifest:
    """Shards of the given sizes per split; sample indices run across each split's shards. Labels
    come from `label_fn(index)` (the images' own signal follows `label_of`), images from
    `image_fn(index)` when given, else `encoded_image`."""
    image_fn = image_fn or (lambda j: encoded_image(j, shape, learnable))
    num_classes = len(label_names)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shard_sizes in sizes.items():
        infos, start = [], 0
        for i, n in enumerate(shard_sizes):
            idx = list(range(start, start + n))
            infos.append(
                write_shard(
                    root / shard_name(split, i),
                    [sample_key(split, j) for j in idx],
                    np.stack([image_fn(j) for j in idx]),
                    np.array([label_fn(j) for j in idx]),
                    [{"index": j} for j in idx],
                    "npy",
                    num_classes,
                )
            )
            start += n
        counts = tuple(int(sum(s.class_counts[c] for s in infos)) for c in range(num_classes))
        splits[split] = SplitInfo(start, counts, False, tuple(infos))
    manifest = Manifest("npy", shape, tuple(label_names), splits, {"format": "test"}, 0, 0, "test", root=root)
    manifest.save(root)
    return Manifest.load(root)


def rewrite_shard(path: Path, edit) -> None:
    """Rewrite a shard member by member: `edit(name, data)` returns new bytes, or None to drop it."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            new = edit(m.name, data)
            if new is not None:
                m.size = len(new)
                tar.addfile(m, io.BytesIO(new))
    path.write_bytes(buf.getvalue())


def member_offset(path: Path, name: str) -> tuple[int, int]:
    """(byte offset, size) of a member's data in a shard, for flipping bytes in place."""
    with tarfile.open(path) as tar:
        m = tar.getmember(name)
        return m.offset_data, m.size


def embedding_of(index: int, dim: int = 16) -> np.ndarray:
    """A float16 vector whose first values carry the label (a linear probe learns it) and the index."""
    rng = np.random.default_rng(index)
    vector = rng.normal(0, 1, dim)
    vector[0] += 2.0 * label_of(index) - 1.0
    vector[-1] = index / 1000
    return vector.astype(np.float16)


def make_embedding_dataset(root: Path, sizes: dict[str, list[int]], dim: int = 16) -> Manifest:
    """Embedding shards (float16 vectors of `dim`, no .json) in the manifest contract `histo-dist embed` writes."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shard_sizes in sizes.items():
        infos, start = [], 0
        for i, n in enumerate(shard_sizes):
            idx = range(start, start + n)
            keys = [sample_key(split, j) for j in idx]
            vectors = np.stack([embedding_of(j, dim) for j in idx])
            infos.append(
                write_shard(root / shard_name(split, i), keys, vectors, [label_of(j) for j in idx], None, "npy", 2)
            )
            start += n
        counts = tuple(int(sum(s.class_counts[c] for s in infos)) for c in range(2))
        splits[split] = SplitInfo(start, counts, False, tuple(infos))
    Manifest(
        "npy", (dim,), ("negative", "positive"), splits, {"format": "test"}, 0, 0, "test", root=root, dtype="float16"
    ).save(root)
    return Manifest.load(root)
