"""Corrupt shards, manifests that do not match their shards, shards of another conversion mixed in,
and a full disk while `histo-dist convert` writes a shard.

Corrupt data is named (shard and key) by the loader and by `histo-dist verify`; training stops with
that error, or, only with `loader.skip_corrupt=true`, skips and counts what it cannot read.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from histo_dist.files import sha256_file
from histo_dist.loader import LoaderConfig, ShardLoader
from histo_dist.manifest import Manifest, sample_key
from histo_dist.shards import ShardError, write_shard
from histo_dist.verify import verify_dataset
from tests.faults.harness import SHAPE, SIZES, limit_file_size, no_traceback, train_cmd
from tests.runs import ENV, run
from tests.shard_data import encoded_image, label_of, make_dataset, member_offset, rewrite_shard
from tests.source_data import cli, convert_args, write_pcam

# ---------------------------------------------------------------------------------------------
# Damage, applied to a copy of the session's dataset


def copy_of(shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(shards, tmp_path / "shards"))


def truncate_at(shard: Path, key: str) -> None:
    """Cut the shard in the middle of `key`'s image: that sample and all after it are lost."""
    offset, size = member_offset(shard, f"{key}.npy")
    shard.write_bytes(shard.read_bytes()[: offset + size // 2])


def flip(shard: Path, name: str, at: int, count: int = 1) -> None:
    offset, _ = member_offset(shard, name)
    data = bytearray(shard.read_bytes())
    for i in range(offset + at, offset + at + count):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))


KEY = sample_key("train", 69)  # the 6th sample of train-000001.tar (samples 64..127)
SHARD = "train-000001.tar"
DAMAGE = {
    # name: (damage, what the loader says, whether the loader can name the key)
    "truncated tar": (lambda p: truncate_at(p, KEY), "truncated", False),
    "flipped bytes in an image header": (lambda p: flip(p, f"{KEY}.npy", 0, 6), "cannot decode", True),
    "undecodable image": (
        lambda p: rewrite_shard(p, lambda n, d: b"\x93NUMPY garbage" if n == f"{KEY}.npy" else d),
        "cannot decode",
        True,
    ),
    "missing label": (
        lambda p: rewrite_shard(p, lambda n, d: None if n == f"{KEY}.cls" else d),
        r"no label \(.cls\)",
        True,
    ),
    "label out of range": (
        lambda p: rewrite_shard(p, lambda n, d: b"7" if n == f"{KEY}.cls" else d),
        "label 7 outside",
        True,
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("training", [True, False], ids=["train loader", "eval loader"])
def test_loader_names_shard_and_key_of_corrupt_data(shards, tmp_path, damage, training):
    root = copy_of(shards, tmp_path)
    hurt, says, names_key = DAMAGE[damage]
    hurt(root / SHARD)
    # One loader worker: the error crosses the process boundary and still reads as the plain message.
    cfg = LoaderConfig(batch_size=16, eval_batch_size=32, num_workers=1, shuffle_buffer=64)
    loader = ShardLoader(Manifest.load(root), "train", cfg, training=training)
    with pytest.raises(ShardError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith(f"{root / SHARD}: ") and "Traceback" not in message, message
    assert (repr(KEY) in message) == names_key, message
    assert re.search(says, message), message


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_shard_and_key_of_corrupt_data(shards, tmp_path, capsys, damage):
    root = copy_of(shards, tmp_path)
    DAMAGE[damage][0](root / SHARD)
    problems = verify_dataset(root)[1]
    assert problems and all(str(root / SHARD) in p for p in problems), problems
    assert any("sha256" in p for p in problems)
    assert any(repr(KEY) in p for p in problems) or damage == "truncated tar", problems
    rc, out, _ = cli(capsys, "verify", root, "--no-progress")
    assert rc == 1 and SHARD in out


def test_flipped_pixel_bytes_only_the_checksum_can_tell(shards, tmp_path):
    root = copy_of(shards, tmp_path)
    _, size = member_offset(root / SHARD, f"{KEY}.npy")
    flip(root / SHARD, f"{KEY}.npy", size - 10)  # a pixel: still a valid .npy of the right shape
    problems = verify_dataset(root)[1]
    assert len(problems) == 1 and SHARD in problems[0] and "sha256 differs" in problems[0]
    # The loader does not hash shards as it streams them: it reads the changed pixel (run verify).
    batches = list(
        ShardLoader(Manifest.load(root), "train", LoaderConfig(eval_batch_size=64, num_workers=0), training=False)
    )
    assert sum(len(b["key"]) for b in batches) == 192


@pytest.mark.slow
def test_training_stops_with_the_error_naming_shard_and_key(shards, tmp_path):
    root = copy_of(shards, tmp_path)
    DAMAGE["undecodable image"][0](root / SHARD)
    out = run(train_cmd(root, tmp_path / "run", "loader.num_workers=1"))
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"histo-dist train: error: {root / SHARD}: sample {KEY!r}: cannot decode" in out.stderr
    no_traceback(out.stderr)


# ---------------------------------------------------------------------------------------------
# loader.skip_corrupt


def damaged_for_skipping(root: Path) -> dict[str, int]:
    """Damage in every split; returns how many samples of each split can no longer be read."""
    rewrite_shard(root / "train-000001.tar", lambda n, d: b"\x93NUMPY garbage" if n == f"{KEY}.npy" else d)
    rewrite_shard(root / "train-000001.tar", lambda n, d: None if n == f"{sample_key('train', 70)}.cls" else d)
    truncate_at(root / "train-000002.tar", sample_key("train", 128 + 32))  # 32 samples lost: 2 whole batches
    rewrite_shard(root / "valid-000000.tar", lambda n, d: None if n == f"{sample_key('valid', 3)}.cls" else d)
    truncate_at(root / "valid-000001.tar", sample_key("valid", 32 + 20))  # 12 samples lost
    rewrite_shard(root / "test-000000.tar", lambda n, d: b"not an npy" if n == f"{sample_key('test', 5)}.npy" else d)
    return {"train": 2 + 32, "valid": 1 + 12, "test": 1}


@pytest.mark.parametrize("world", [1, 2])
def test_skipping_keeps_equal_full_length_epochs_and_counts_every_skipped_sample(shards, tmp_path, world):
    root = copy_of(shards, tmp_path)
    lost = damaged_for_skipping(root)
    manifest = Manifest.load(root)
    cfg = LoaderConfig(batch_size=16, eval_batch_size=32, num_workers=2, shuffle_buffer=0, skip_corrupt=True)
    for split in ("train", "valid", "test"):
        steps, read, skipped, empty = [], 0, 0, 0
        for rank in range(world):
            loader = ShardLoader(manifest, split, cfg, rank=rank, world_size=world, training=split == "train")
            batches = list(loader)
            steps.append(len(batches))
            assert len(batches) == len(loader)  # no batch dropped: every rank takes its planned steps
            read += sum(len(b["key"]) for b in batches)
            skipped += sum(b["skipped"] for b in batches)
            empty += sum(not b["key"] for b in batches)
        assert len(set(steps)) == 1, steps
        assert read + skipped == manifest.split(split).num_samples  # every sample read or counted
        assert skipped == lost[split], split
        if split == "train":
            assert empty == 2  # two batches wholly inside the lost part of the truncated shard


@pytest.mark.slow
def test_training_with_skip_corrupt_counts_logs_and_reports_skipped_samples(
    shards, tmp_path, caplog, keep_signal_handlers
):
    from histo_dist.experiment import load_experiment
    from histo_dist.train import train

    root = copy_of(shards, tmp_path)
    lost = damaged_for_skipping(root)
    run_dir = tmp_path / "run"
    cfg = load_experiment(
        Path(__file__).parents[2] / "configs/cpu_test.yaml",
        [
            f"data.shards={root}",
            "loader.batch_size=16",
            "loader.eval_batch_size=32",
            "loader.num_workers=0",
            "loader.shuffle_buffer=0",
            "loader.skip_corrupt=true",
            "train.epochs=2",
            "tracking.log_every_steps=2",
            "tracking.progress=false",
            "tracking.wandb=false",
        ],
    )
    with caplog.at_level(logging.WARNING):
        results = train(cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records[-1]["skipped_samples"] == 2 * lost["train"]  # every epoch reads every training sample
    assert all(np.isfinite(r["loss"]) for r in train_records)  # the two empty batches took zero steps
    valid = [r for r in records if r["kind"] == "valid"]
    assert [r["skipped_samples"] for r in valid] == [lost["valid"]] * 2
    assert [r["num_samples"] for r in valid] == [64 - lost["valid"]] * 2
    test = json.loads((run_dir / "test/metrics.json").read_text())
    assert test == results
    assert (test["skipped_samples"], test["num_samples"], test["train_skipped_samples"]) == (1, 31, 2 * lost["train"])
    text = caplog.text
    assert f"{root / 'train-000001.tar'}: sample {KEY!r}: cannot decode" in text
    assert f"{root / 'train-000001.tar'}: sample {sample_key('train', 70)!r}: no label" in text
    assert f"{root / 'train-000002.tar'}: ends after 32 samples" in text
    assert (
        f"corrupt samples skipped (loader.skip_corrupt): {2 * lost['train']} in training, 1 in the test split" in text
    )


# ---------------------------------------------------------------------------------------------
# Manifests that do not match their shards; shards of another conversion


def shard_of(root: Path, name: str, split: str, indices, shape=SHAPE, learnable=True) -> None:
    idx = list(indices)
    write_shard(
        root / name,
        [sample_key(split, j) for j in idx],
        np.stack([encoded_image(j, shape, learnable) for j in idx]),
        np.array([label_of(j) for j in idx]),
        [{"index": j} for j in idx],
        "npy",
        2,
    )


MISMATCH = {
    # name: (change, loader error (None: it cannot tell), an error even with skip_corrupt, a problem verify reports)
    "shard of another split under this name": (
        lambda r: shutil.copy(r / "test-000000.tar", r / "valid-000001.tar"),  # 32 samples, as listed
        r"valid-000001.tar: sample 'test_000000000' is not of split 'valid'",
        True,
        r"valid-000001.tar: 32 sample\(s\) not of split 'valid' \(first: 'test_000000000'\)",
    ),
    "shard holding more samples than listed": (
        lambda r: shard_of(r, "valid-000001.tar", "valid", range(32, 70)),
        r"valid-000001.tar: holds more samples than the manifest's 32",
        True,
        r"valid-000001.tar: 38 samples, manifest says 32",
    ),
    "shard holding fewer samples than listed": (
        lambda r: shard_of(r, "valid-000001.tar", "valid", range(32, 60)),
        r"valid-000001.tar: ends after 28 samples, the manifest says 32",
        True,
        r"valid-000001.tar: 28 samples, manifest says 32",
    ),
    "manifest of another conversion": (
        lambda r: make_dataset(r / "other", {**SIZES, "valid": [40, 24]}, shape=SHAPE).save(r),
        r"valid-000000.tar: ends after 32 samples, the manifest says 40",
        True,
        r"valid-000000.tar: 32 samples, manifest says 40",
    ),
    "shard of a conversion with another image size": (  # undecodable as this dataset: skipped if asked to
        lambda r: shard_of(r, "valid-000001.tar", "valid", range(32, 64), shape=(16, 16, 3)),
        r"valid-000001.tar: sample 'valid_000000032': cannot decode \(array is uint8 \(16, 16, 3\)",
        False,
        r"valid-000001.tar: sample 'valid_000000032': cannot decode",
    ),
    # Same split, keys, count and shape, other pixels: only the checksum can tell (the loader does
    # not hash what it streams; `histo-dist verify` does).
    "shard of a conversion of other data": (
        lambda r: shard_of(r, "valid-000001.tar", "valid", range(32, 64), learnable=False),
        None,
        False,
        r"valid-000001.tar: sha256 differs from the manifest",
    ),
    "stray tar of another conversion in the folder": (
        lambda r: shutil.copy(r / "valid-000000.tar", r / "valid-000007.tar"),
        None,
        False,  # the loader reads the shards the manifest lists, nothing else
        r"valid-000007.tar: a shard the manifest does not list \(from another conversion\?\)",
    ),
}


@pytest.mark.parametrize("mismatch", MISMATCH)
def test_manifest_mismatch_is_named_by_loader_and_verify(shards, tmp_path, mismatch):
    root = copy_of(shards, tmp_path)
    change, loader_says, even_when_skipping, verify_says = MISMATCH[mismatch]
    change(root)
    for skip in (False, True) if even_when_skipping else (False,):
        cfg = LoaderConfig(eval_batch_size=32, num_workers=1, skip_corrupt=skip)
        loader = ShardLoader(Manifest.load(root), "valid", cfg, training=False)
        if loader_says is None:
            assert sum(len(b["key"]) for b in loader) == 64
        else:
            with pytest.raises(ShardError, match=loader_says):
                list(loader)
    problems = verify_dataset(root, ["valid"])[1]
    assert any(re.search(verify_says, p) for p in problems), problems


# ---------------------------------------------------------------------------------------------
# Disk full while converting


@pytest.mark.slow
def test_disk_full_while_writing_a_shard_is_a_clear_error_and_keeps_the_complete_shards(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_pcam(src, {"train": 48, "valid": 16, "test": 16})  # 5 shards of 16 (96x96 npy: 450 KB each)
    args = convert_args(src, out)
    assert cli(capsys, *args, "--part", "0/2")[0] == 0  # an earlier run wrote shards 0, 2, 4 of the plan
    kept = {p.name: sha256_file(p) for p in out.glob("*.tar")}
    assert sorted(kept) == ["test-000000.tar", "train-000000.tar", "train-000002.tar"]
    done = subprocess.run(
        [sys.executable, "-m", "histo_dist", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        preexec_fn=limit_file_size(100_000),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"histo-dist convert: error: {out / 'train-000001.tar'}: cannot write shard (File too large)" in done.stderr
    no_traceback(done.stderr)
    assert {p.name: sha256_file(p) for p in out.glob("*.tar")} == kept  # complete shards intact, no partial one
    assert not list(out.glob(".*.partial")) and not (out / "manifest.json").exists()
    # With space again, the same command completes the conversion.
    assert cli(capsys, *args)[0] == 0
    assert cli(capsys, "verify", out, "--no-progress")[0] == 0
    assert all(sha256_file(out / name) == digest for name, digest in kept.items())
