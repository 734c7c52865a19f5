"""Embedding datasets (float16 vectors in the shard contract): verify checks them, ShardLoader reads them
exactly, and MemoryLoader serves them from memory with ShardLoader's guarantees."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from histo_dist.loader import LoaderConfig, MemoryLoader, ShardLoader, split_loader
from histo_dist.manifest import Manifest, ManifestError
from histo_dist.shards import write_shard
from histo_dist.verify import verify_dataset
from tests.shard_data import embedding_of, global_steps, label_of, make_embedding_dataset, rewrite_shard

SIZES = {"train": [40, 33, 27], "valid": [25, 12]}


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory) -> Manifest:
    return make_embedding_dataset(tmp_path_factory.mktemp("emb"), SIZES, dim=16)


def index_of(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


def test_manifest_says_what_the_samples_are(embeddings):
    assert embeddings.embeddings and embeddings.dtype == "float16" and embeddings.image_shape == (16,)
    assert '"dtype": "float16"' in (embeddings.root / "manifest.json").read_text()


def test_a_manifest_with_vectors_of_another_dtype_or_shape_is_refused(embeddings, tmp_path):
    text = (embeddings.root / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text.replace('"float16"', '"float64"'))
    with pytest.raises(ManifestError, match="dtype 'float64' is not one of uint8, float16"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(text.replace('"image_shape": [\n    16\n  ]', '"image_shape": [4, 4]'))
    with pytest.raises(ManifestError, match=r"vectors: image_shape \[D\]"):
        Manifest.load(tmp_path)


def test_verify_decodes_every_vector_and_names_bad_ones(embeddings, tmp_path):
    _, problems = verify_dataset(embeddings.root)
    assert problems == []
    copy = make_embedding_dataset(tmp_path / "bad", SIZES, dim=16)
    nan = np.full(16, np.nan, np.float16)
    short = np.zeros(8, np.float16)

    def npy(array):
        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    rewrite_shard(copy.root / "train-000001.tar", lambda n, d: npy(nan) if n == "train_000000041.npy" else d)
    rewrite_shard(copy.root / "valid-000000.tar", lambda n, d: npy(short) if n == "valid_000000003.npy" else d)
    _, problems = verify_dataset(copy.root)
    assert any("train_000000041" in p and "NaN or inf" in p for p in problems), problems
    assert any("valid_000000003" in p and "expected float16 (16,)" in p for p in problems), problems


def test_shard_loader_reads_the_vectors_as_written(embeddings):
    batches = list(ShardLoader(embeddings, "valid", LoaderConfig(eval_batch_size=8, num_workers=1), training=False))
    vectors = torch.cat([b["image"] for b in batches])
    keys = [k for b in batches for k in b["key"]]
    assert vectors.dtype == torch.float16 and vectors.shape == (37, 16)
    assert torch.equal(vectors, torch.from_numpy(np.stack([embedding_of(index_of(k)) for k in keys])))
    assert [int(v) for b in batches for v in b["label"]] == [label_of(index_of(k)) for k in keys]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_memory_loader_evaluation_reads_every_sample_once(embeddings, world):
    keys, vectors = [], []
    for rank in range(world):
        loader = split_loader(
            embeddings, "valid", LoaderConfig(eval_batch_size=5), rank=rank, world_size=world, training=False
        )
        assert isinstance(loader, MemoryLoader)
        batches = list(loader)
        assert len(batches) == len(loader) and sum(len(b["key"]) for b in batches) == loader.rank_samples
        keys += [k for b in batches for k in b["key"]]
        vectors += [b["image"] for b in batches]
    assert sorted(keys) == [f"valid_{i:09d}" for i in range(37)]
    assert torch.equal(torch.cat(vectors), torch.from_numpy(np.stack([embedding_of(index_of(k)) for k in keys])))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_memory_loader_training_equal_steps_disjoint_ranks_new_order_each_epoch(embeddings, world):
    cfg = LoaderConfig(batch_size=8)
    loaders = [MemoryLoader(embeddings, "train", cfg, rank=r, world_size=world, seed=3) for r in range(world)]
    assert len({len(lo) for lo in loaders}) == 1 and len(loaders[0]) == 100 // world // 8
    epoch0 = [[k for b in lo for k in b["key"]] for lo in loaders]
    assert all(len(keys) == len(loaders[0]) * 8 for keys in epoch0)
    assert len({k for keys in epoch0 for k in keys}) == sum(map(len, epoch0))  # no sample on two ranks
    epoch1 = [k for b in loaders[0] for k in b["key"]]
    assert loaders[0].epoch == 1 and epoch1 != epoch0[0]
    again = MemoryLoader(embeddings, "train", cfg, rank=0, world_size=world, seed=3)
    assert [k for b in again for k in b["key"]] == epoch0[0]  # deterministic from (seed, epoch)


def test_memory_loader_resumes_with_exactly_the_remaining_batches(embeddings):
    cfg = LoaderConfig(batch_size=8)
    loader = MemoryLoader(embeddings, "train", cfg, seed=1)
    full = [b["key"] for b in loader] + [b["key"] for b in loader]  # two epochs
    first = MemoryLoader(embeddings, "train", cfg, seed=1)
    it = iter(first)
    for _ in range(5):
        next(it)
    resumed = MemoryLoader(embeddings, "train", cfg, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert [b["key"] for b in resumed] == full[5 : len(loader)]
    assert [b["key"] for b in resumed] == full[len(loader) :]
    with pytest.raises(Exception, match="cannot resume the train loader exactly: seed"):
        MemoryLoader(embeddings, "train", cfg, seed=2).load_state_dict(first.state_dict())


def memory_steps(embeddings, world: int, accumulation: int, start: dict | None = None) -> list[list[str]]:
    """The keys each optimizer step of the rest of the epoch trains on, all ranks together (sorted within a step)."""

    def loader(rank: int) -> MemoryLoader:
        cfg = LoaderConfig(batch_size=4)
        loader = MemoryLoader(embeddings, "train", cfg, rank=rank, world_size=world, seed=5, accumulation=accumulation)
        if start is not None:
            loader.load_state_dict(start)
        return loader

    return global_steps((loader(rank) for rank in range(world)), accumulation)


@pytest.mark.parametrize("before, after", [((2, 1), (1, 2)), ((1, 2), (2, 1)), ((4, 1), (2, 2)), ((1, 4), (4, 1))])
def test_memory_loader_elastic_resume_continues_with_exactly_the_samples_not_consumed(embeddings, before, after):
    """Preempted after two optimizer steps on one layout (ranks, accumulation), resumed on another with the same
    global batch (8 or 16): the remaining steps are those of the uninterrupted run, each sample once in the epoch."""
    reference = memory_steps(embeddings, *before)
    world, accumulation = before
    loaders = [
        MemoryLoader(
            embeddings, "train", LoaderConfig(batch_size=4), rank=r, world_size=world, seed=5, accumulation=accumulation
        )
        for r in range(world)
    ]
    for loader in loaders:
        it = iter(loader)
        for _ in range(2 * accumulation):  # two optimizer steps on every rank
            next(it)
    states = [loader.state_dict() for loader in loaders]
    assert all(state == states[0] for state in states)  # the state says nothing of the rank: any rank's resumes
    resumed = memory_steps(embeddings, *after, start=states[0])
    global_batch = 4 * world * accumulation
    assert resumed == reference[2:] and len(reference) == 100 // global_batch
    trained = [k for step in reference[:2] + resumed for k in step]
    assert len(trained) == len(set(trained)) == len(reference) * global_batch


def test_write_shard_without_metadata_writes_no_json(tmp_path):
    info = write_shard(
        tmp_path / "train-000000.tar", ["train_000000000"], np.zeros((1, 4), np.float16), [1], None, "npy", 2
    )
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert tar.getnames() == ["train_000000000.cls", "train_000000000.npy"]
    assert info.num_samples == 1 and info.class_counts == (0, 1)
