"""Per-rank streaming loaders: equal steps, exact-once evaluation, disjoint training, exact and elastic resume.

Shards here are made with images that encode their own sample index and label (every pixel of
channel 0/1 holds the index, channel 2 the label), so any batch can be checked for detached labels.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from histo_dist.errors import HistoDistError
from histo_dist.loader import LoaderConfig, ShardLoader, TrainOrder, eval_plan, shard_order, steps_per_epoch
from histo_dist.manifest import Manifest, sample_key
from histo_dist.shards import ShardError, write_shard
from tests.shard_data import encoded_image, global_steps, label_of, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Manifest:
    # Uneven shards, fewer shards than ranks x workers in some combinations.
    return make_dataset(tmp_path_factory.mktemp("shards"), {"train": [40, 13, 64, 7, 50], "valid": [30, 11, 25]})


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def index_of(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


# ---------------------------------------------------------------------------------------------
# The plan alone (pure functions): every combination of ranks and workers


LAYOUTS = [[40, 13, 64, 7, 50], [100], [1, 1, 1, 97], [10] * 12]


@pytest.mark.parametrize("sizes", LAYOUTS)
@pytest.mark.parametrize("window", [0, 1, 10, 64])
def test_the_training_order_is_every_sample_once(sizes, window):
    order = TrainOrder(sizes, seed=5, epoch=2, window=window)
    refs = order.refs(0, sum(sizes))
    assert sorted(map(tuple, refs[:, :2].tolist())) == [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    starts = np.asarray([order.stream_start[shard] for shard in refs[:, 0].tolist()])
    assert (refs[:, 2] == starts + refs[:, 1]).all()  # the stream position of each (shard, row)
    if window <= 1:  # no shuffle: the stream itself
        assert refs[:, 2].tolist() == list(range(sum(sizes)))
    assert (order.refs(7, 19) == refs[7:19]).all()  # any slice, computed alone, is the same


@pytest.mark.parametrize("sizes", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_plan_exact_once_eval(sizes, world, workers):
    evaluated = []
    for rank in range(world):
        for w in range(max(workers, 1)):
            plan = eval_plan(sizes, rank=rank, world_size=world, num_workers=workers, worker=w)
            evaluated += [(seg.shard, i) for seg in plan.segments for i in range(seg.start, seg.stop)]
    assert sorted(evaluated) == sorted((s, i) for s, n in enumerate(sizes) for i in range(n))  # each exactly once


def test_shard_order_depends_on_seed_and_epoch_only():
    orders = {e: tuple(shard_order(20, seed=1, epoch=e, training=True)) for e in range(5)}
    assert len(set(orders.values())) == 5  # a new order every epoch
    assert tuple(shard_order(20, seed=1, epoch=3, training=True)) == orders[3]  # reproducible on every rank
    assert tuple(shard_order(20, seed=2, epoch=3, training=True)) != orders[3]
    assert list(shard_order(20, seed=1, epoch=3, training=False)) == list(range(20))


# ---------------------------------------------------------------------------------------------
# The loader reading real shards


def epoch_steps(
    dataset,
    world: int,
    workers: int,
    accumulation: int,
    batch: int,
    seed: int = 0,
    epoch: int = 0,
    start: dict | None = None,
) -> list[list[str]]:
    """The keys each optimizer step trains on, all ranks together (sorted within a step)."""

    def loader(rank: int) -> ShardLoader:
        cfg = LoaderConfig(batch_size=batch, num_workers=workers, shuffle_buffer=32)
        loader = ShardLoader(dataset, "train", cfg, rank=rank, world_size=world, seed=seed, accumulation=accumulation)
        loader.set_epoch(epoch)
        if start is not None:
            loader.load_state_dict(start)
        return loader

    return global_steps((loader(rank) for rank in range(world)), accumulation)


@pytest.mark.parametrize("world,workers,accumulation", [(1, 0, 4), (2, 2, 2), (4, 3, 1), (1, 3, 4)])
def test_global_steps_are_the_same_whatever_the_ranks_workers_and_accumulation(dataset, world, workers, accumulation):
    """Global batch 32 as 1 x 8 x 4, 2 x 8 x 2, 4 x 8 x 1: the same samples in every step, each once per epoch."""
    reference = epoch_steps(dataset, 1, 0, 4, 8)
    got = epoch_steps(dataset, world, workers, accumulation, 8)
    assert got == reference
    assert len(reference) == steps_per_epoch(174, 32) == 5
    keys = [k for step in reference for k in step]
    assert len(set(keys)) == len(keys) == 160


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 3), (4, 1)])
def test_loader_evaluation_reads_every_sample_exactly_once(dataset, world, workers):
    cfg = LoaderConfig(eval_batch_size=7, num_workers=workers)
    seen, counted = [], 0
    for rank in range(world):
        loader = ShardLoader(dataset, "valid", cfg, rank=rank, world_size=world, training=False)
        keys = keys_of(loader)
        assert len(keys) == loader.rank_samples
        counted += loader.rank_samples
        seen += keys
    assert sorted(seen) == [sample_key("valid", i) for i in range(66)]
    assert counted == dataset.split("valid").num_samples


def test_labels_and_keys_stay_attached_to_their_images(dataset):
    loader = ShardLoader(dataset, "train", LoaderConfig(batch_size=16, num_workers=2, shuffle_buffer=64), seed=3)
    for batch in loader:
        images = batch["image"].numpy().astype(np.int64)
        assert batch["image"].shape[1:] == (3, 8, 8) and batch["image"].dtype == torch.uint8
        for image, label, key in zip(images, batch["label"].tolist(), batch["key"]):
            index = index_of(key)
            assert image[0, 0, 0] + 256 * image[1, 0, 0] == index
            assert label == label_of(index) and image[2, 0, 0] == label * 200


def test_shuffle_changes_order_every_epoch_and_is_deterministic(dataset):
    cfg = LoaderConfig(batch_size=8, num_workers=2, shuffle_buffer=32)

    def epoch_keys(seed, epoch):
        loader = ShardLoader(dataset, "train", cfg, seed=seed)
        loader.set_epoch(epoch)
        return keys_of(loader)

    assert epoch_keys(0, 1) == epoch_keys(0, 1)
    assert epoch_keys(0, 1) != epoch_keys(0, 2)
    assert epoch_keys(0, 1) != epoch_keys(1, 1)
    # The buffer mixes across shards: consecutive samples of the stream are rarely consecutive in output.
    keys = [index_of(k) for k in epoch_keys(0, 1)]
    runs = sum(1 for a, b in zip(keys, keys[1:]) if b == a + 1)
    assert runs < len(keys) // 4


@pytest.mark.parametrize(
    "before, after", [((2, 2, 1), (1, 0, 2)), ((1, 1, 2), (2, 3, 1)), ((1, 2, 4), (1, 0, 4)), ((4, 0, 1), (2, 2, 2))]
)
def test_elastic_resume_continues_with_exactly_the_samples_not_consumed(dataset, before, after):
    """Preempted mid-epoch on one layout (ranks, workers, accumulation), resumed on another with the same global
    batch: the remaining steps are those of an uninterrupted run, so the epoch trains every sample once."""
    reference = epoch_steps(dataset, *before, 8, seed=3, epoch=1)
    world, workers, accumulation = before
    loader = ShardLoader(
        dataset,
        "train",
        LoaderConfig(batch_size=8, num_workers=workers, shuffle_buffer=32),
        world_size=world,
        seed=3,
        accumulation=accumulation,
    )
    loader.set_epoch(1)
    for _ in itertools.islice(loader, 2 * accumulation):  # two optimizer steps
        pass
    state = loader.state_dict()
    assert state["samples"] == 2 * 8 * world * accumulation
    assert "world_size" not in state and "num_workers" not in state
    resumed = epoch_steps(dataset, *after, 8, seed=3, epoch=1, start=state)
    assert resumed == reference[2:]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (2, 3)])
def test_resume_yields_exactly_the_remaining_batches(dataset, world, workers):
    cfg = LoaderConfig(batch_size=4, num_workers=workers, shuffle_buffer=16)
    rank = world - 1
    reference = ShardLoader(dataset, "train", cfg, rank=rank, world_size=world, seed=9)
    reference.set_epoch(1)
    full = list(reference)
    expected = [(tuple(b["key"]), b["seed"].tolist()) for b in full]
    for position in sorted({0, 1, 2, workers + 1, len(full) // 2, len(full) - 1}):
        # Save the state after `position` batches of an interrupted run, restore it in a fresh loader.
        interrupted = ShardLoader(dataset, "train", cfg, rank=rank, world_size=world, seed=9)
        interrupted.set_epoch(1)
        for _ in itertools.islice(interrupted, position):
            pass
        state = interrupted.state_dict()
        assert state["samples"] == position * 4 * world
        resumed = ShardLoader(dataset, "train", cfg, rank=rank, world_size=world, seed=9)
        resumed.load_state_dict(state)
        got = [(tuple(b["key"]), b["seed"].tolist()) for b in resumed]
        assert got == expected[position:], f"resume at batch {position}"


def test_resume_at_every_batch_when_windows_and_batches_do_not_align(dataset):
    """Shuffle windows of >= 10 samples (whole shards: 40, 13, 64...) cut into batches of 3: batches straddle
    windows, and a resume draws no window before its own. Every position must still resume exactly."""
    cfg = LoaderConfig(batch_size=3, num_workers=0, shuffle_buffer=10)
    reference = ShardLoader(dataset, "train", cfg, seed=5)
    expected = [(tuple(b["key"]), b["seed"].tolist()) for b in reference]
    assert len({k for keys, _ in expected for k in keys}) == 3 * len(expected)  # disjoint, all full
    for position in range(len(expected)):
        resumed = ShardLoader(dataset, "train", cfg, seed=5)
        resumed.load_state_dict({**reference.state_dict(), "epoch": 0, "samples": 3 * position})
        assert [(tuple(b["key"]), b["seed"].tolist()) for b in resumed] == expected[position:], position


def test_shuffle_mixes_shards_within_a_window(dataset):
    """A batch mixes samples of the shards in its window (not one shard after another)."""
    cfg = LoaderConfig(batch_size=8, num_workers=0, shuffle_buffer=100)
    shard_of = {}
    for shard, info in enumerate(dataset.split("train").shards):
        start = sum(s.num_samples for s in dataset.split("train").shards[:shard])
        shard_of.update({sample_key("train", start + i): shard for i in range(info.num_samples)})
    batches = [b["key"] for b in ShardLoader(dataset, "train", cfg, seed=1)]
    assert sum(len({shard_of[k] for k in keys}) > 1 for keys in batches) > len(batches) // 2


def test_resume_refuses_another_order_or_global_batch(dataset):
    a = ShardLoader(dataset, "train", LoaderConfig(batch_size=4, num_workers=2), seed=0)
    b = ShardLoader(dataset, "train", LoaderConfig(batch_size=8, num_workers=2), seed=0)
    with pytest.raises(HistoDistError, match="global_batch: saved 4, now 8"):
        b.load_state_dict(a.state_dict())
    c = ShardLoader(dataset, "train", LoaderConfig(batch_size=4, shuffle_buffer=8), seed=0)
    with pytest.raises(HistoDistError, match="shuffle_buffer"):
        c.load_state_dict(a.state_dict())
    with pytest.raises(HistoDistError, match="earlier histo-dist"):
        a.load_state_dict({"epoch": 0, "batch": 3, "world_size": 1})


def test_augmentation_seeds_are_per_sample_and_reproducible(dataset):
    cfg = LoaderConfig(batch_size=8, num_workers=0, shuffle_buffer=16)
    first = list(ShardLoader(dataset, "train", cfg, seed=1))
    seeds = torch.cat([b["seed"] for b in first])
    assert len(set(seeds.tolist())) == len(seeds)  # every sample its own stream
    again = torch.cat([b["seed"] for b in ShardLoader(dataset, "train", cfg, seed=1)])
    assert torch.equal(seeds, again)


def test_worker_transform_receives_images_and_seeds(dataset):
    def transform(images, seeds):
        return images.float() + (seeds % 2).view(-1, 1, 1, 1).float() * 1000

    loader = ShardLoader(dataset, "train", LoaderConfig(batch_size=8, num_workers=2), seed=0, transform=transform)
    batch = next(iter(loader))
    assert batch["image"].dtype == torch.float32
    assert torch.equal((batch["image"][:, 0, 0, 0] >= 1000), (batch["seed"] % 2 == 1))


def test_too_small_split_is_a_clear_error(dataset):
    with pytest.raises(HistoDistError, match="lower loader.batch_size"):
        ShardLoader(dataset, "train", LoaderConfig(batch_size=100), world_size=2)
    with pytest.raises(HistoDistError, match="split 'test' not in this dataset"):
        ShardLoader(dataset, "test", LoaderConfig())


def test_truncated_shard_is_named(tmp_path):
    manifest = make_dataset(tmp_path, {"train": [20, 20], "valid": [20, 20]})
    shard = tmp_path / "valid-000001.tar"
    shard.write_bytes(shard.read_bytes()[: 512 * 30])
    loader = ShardLoader(manifest, "valid", LoaderConfig(eval_batch_size=8, num_workers=0), training=False)
    with pytest.raises(ShardError, match="valid-000001.tar"):
        list(loader)


def test_shard_with_fewer_samples_than_manifest_is_an_error(tmp_path):
    manifest = make_dataset(tmp_path, {"valid": [20, 20]})
    # Replace shard 1 by a valid shard holding only 15 samples: the tar is fine, the count is not.
    idx = list(range(20, 35))
    write_shard(
        tmp_path / "valid-000001.tar",
        [sample_key("valid", j) for j in idx],
        np.stack([encoded_image(j) for j in idx]),
        np.array([label_of(j) for j in idx]),
        [{}] * 15,
        "npy",
        2,
    )
    loader = ShardLoader(manifest, "valid", LoaderConfig(eval_batch_size=8, num_workers=0), training=False)
    with pytest.raises(ShardError, match=r"valid-000001.tar: ends after 15 samples, the manifest says 20"):
        list(loader)


def test_pipe_urls_read_through_webdataset(dataset):
    local = keys_of(ShardLoader(dataset, "valid", LoaderConfig(num_workers=0), training=False))
    url = f"pipe:cat {dataset.root}/{{name}}"
    piped = keys_of(ShardLoader(dataset, "valid", LoaderConfig(num_workers=0, shard_url=url), training=False))
    assert piped == local


# ---------------------------------------------------------------------------------------------
# Real processes: two ranks under torchrun (gloo)


DIST_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from histo_dist.manifest import Manifest
from histo_dist.loader import LoaderConfig, ShardLoader
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
m = Manifest.load(sys.argv[1])
cfg = LoaderConfig(batch_size=8, eval_batch_size=5, num_workers=2, shuffle_buffer=32)
train = ShardLoader(m, "train", cfg, rank=rank, world_size=world, seed=4)
keys, steps = [], 0
for batch in train:
    dist.all_reduce(torch.ones(1))  # a collective every step, as DDP does: uneven steps would hang
    keys += batch["key"]; steps += 1
valid = ShardLoader(m, "valid", cfg, rank=rank, world_size=world, training=False)
eval_keys = [k for b in valid for k in b["key"]]
gathered = [None] * world
dist.all_gather_object(gathered, (steps, keys, eval_keys))
if rank == 0:
    steps_all = [g[0] for g in gathered]
    train_all = [k for g in gathered for k in g[1]]
    eval_all = [k for g in gathered for k in g[2]]
    assert len(set(steps_all)) == 1, steps_all
    assert len(train_all) == len(set(train_all)), "overlapping training samples"
    assert sorted(eval_all) == sorted(set(eval_all)) and len(eval_all) == m.split("valid").num_samples
    print("DIST-OK", steps_all, len(train_all), len(eval_all))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_real_ranks_under_torchrun(dataset, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(DIST_SCRIPT)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script), str(dataset.root)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # 174 training samples / 2 ranks / batch 8 -> 10 steps each; all 66 validation samples once.
    assert "DIST-OK [10, 10] 160 66" in out.stdout


def test_first_images_reads_a_splits_first_samples_across_shards_in_order(tmp_path):
    from histo_dist.loader import first_images

    manifest = make_dataset(tmp_path / "d", {"train": [5, 4], "valid": [3]}, learnable=True)
    images = first_images(manifest, "train", 7, LoaderConfig())
    assert images.shape == (7, 8, 8, 3)
    assert [int(i[0, 0, 0]) for i in images] == list(range(7))  # the sample index the image carries
    assert np.array_equal(images[6], encoded_image(6, learnable=True))
    assert len(first_images(manifest, "train", 100, LoaderConfig())) == 9  # the whole split
    shard = tmp_path / "d" / manifest.split("train").shards[0].name
    shard.write_bytes(shard.read_bytes()[:2000])  # cut inside the second sample
    with pytest.raises(ShardError, match=f"{shard}"):
        first_images(manifest, "train", 7, LoaderConfig())


def test_an_npy_image_with_another_header_decodes_from_a_numpy_view_of_the_shard():
    """The loader hands decode_image views into the shard's bytes; a header of the usual length that is not the
    usual header (here Fortran order) goes to np.load instead of failing the comparison."""
    import io

    from histo_dist.shards import decode_image, npy_header

    image = encoded_image(3, shape=(8, 8, 3))
    buffer = io.BytesIO()
    np.save(buffer, np.asfortranarray(image))
    data = np.frombuffer(buffer.getvalue(), np.uint8)
    header, nbytes = npy_header((8, 8, 3))
    assert len(data) == len(header) + nbytes and bytes(data[: len(header)]) != header  # same length, other header
    assert np.array_equal(decode_image(data, "npy", (8, 8, 3)), image)
