"""`histo-dist convert`: round trips per codec and layout, determinism, bad input, resume after a kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from histo_dist.files import sha256_file
from tests.source_data import (
    REPO,
    cli,
    convert_args,
    make_images,
    pcam_name,
    read_webdataset,
    tree_hashes,
    write_h5,
    write_imagefolder,
    write_kaggle,
    write_pcam,
    written,
)

EXT = {"npy": "npy", "png": "png", "jpeg": "jpg"}


@pytest.fixture(scope="module")
def pcam(tmp_path_factory):
    """A small PCam folder shared by the tests that only read it: (root, {split: (x, y)})."""
    root = tmp_path_factory.mktemp("pcam")
    return root, write_pcam(root)


def index_of(key: str, split: str) -> int:
    prefix = f"{split}_"
    assert key.startswith(prefix) and len(key) == len(prefix) + 9, key
    return int(key[len(prefix) :])


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def train_order(folder: Path) -> list[int]:
    return [index_of(s["__key__"], "train") for s in read_webdataset(folder, "train")]


# ---------------------------------------------------------------------------------------------
# PCam round trips


@pytest.mark.parametrize("codec", ["npy", "png"])
def test_lossless_round_trip_through_webdataset(pcam, tmp_path, capsys, codec):
    src, data = pcam
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, *convert_args(src, out, "--codec", codec))
    assert rc == 0, err
    assert "converted 100 images" in stdout
    manifest = manifest_of(out)
    assert manifest["codec"] == codec and manifest["image_shape"] == [96, 96, 3]
    assert manifest["label_names"] == ["no_tumor", "tumor"]
    assert manifest["total_samples"] == 100
    assert manifest["source"]["format"] == "pcam"
    assert {f["name"] for f in manifest["source"]["files"]} == {
        pcam_name(s, p) for s in data for p in ("x", "y", "meta")
    }

    for split, (x, y) in data.items():
        info = manifest["splits"][split]
        assert info["num_samples"] == len(x)
        assert info["class_counts"] == np.bincount(y, minlength=2).tolist()
        assert info["shuffled"] == (split == "train")
        assert [sh["name"] for sh in info["shards"]] == [f"{split}-{i:06d}.tar" for i in range(len(info["shards"]))]
        assert [sh["num_samples"] for sh in info["shards"]][:-1] == [16] * (len(info["shards"]) - 1)

        samples = read_webdataset(out, split)
        assert len(samples) == len(x)
        seen = []
        for s in samples:
            i = index_of(s["__key__"], split)
            seen.append(i)
            assert set(s) >= {"cls", "json", codec}
            image = s[codec]
            assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
            np.testing.assert_array_equal(image, x[i], err_msg=f"{s['__key__']} pixels differ")
            assert s["cls"] == y[i]
            assert s["json"]["split"] == split and s["json"]["index"] == i
            assert s["json"]["meta"]["wsi"] == f"slide_{split}_{i % 3}"  # the meta CSV row travels along
        assert sorted(seen) == list(range(len(x)))  # every source image exactly once
        if split == "train":
            assert seen != sorted(seen), "train split was not shuffled at write time"
        else:
            assert seen == list(range(len(x))), f"{split} must keep source order"

        # per-shard class counts and checksums in the manifest are those of the files
        start = 0
        for sh in info["shards"]:
            chunk = samples[start : start + sh["num_samples"]]
            assert {s["__url__"] for s in chunk} == {str(out / sh["name"])}
            assert sh["class_counts"] == np.bincount([s["cls"] for s in chunk], minlength=2).tolist()
            assert sh["sha256"] == sha256_file(out / sh["name"])
            assert sh["bytes"] == (out / sh["name"]).stat().st_size
            start += sh["num_samples"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [sh["name"] for s in manifest["splits"].values() for sh in s["shards"]]
    ), "temporary files (plan, .work, .partial) must be gone after a conversion"


def test_tar_lists_members_per_sample_in_extension_order(pcam, tmp_path, capsys):
    src, data = pcam
    out = tmp_path / "out"
    assert cli(capsys, *convert_args(src, out, "--splits", "valid"))[0] == 0
    assert set(manifest_of(out)["splits"]) == {"valid"}
    listing = subprocess.run(["tar", "tf", str(out / "valid-000000.tar")], capture_output=True, text=True, check=True)
    names = listing.stdout.split()
    expected = [f"valid_{i:09d}.{ext}" for i in range(16) for ext in ("cls", "json", "npy")]
    assert names == expected


def test_jpeg_codec_decodes_with_small_error(pcam, tmp_path, capsys):
    src, data = pcam
    out = tmp_path / "out"
    rc, _, err = cli(capsys, *convert_args(src, out, "--codec", "jpeg", "--jpeg-quality", "90", "--splits", "test"))
    assert rc == 0, err
    x, y = data["test"]
    samples = read_webdataset(out, "test")
    assert len(samples) == len(x)
    errors = []
    for s in samples:
        i = index_of(s["__key__"], "test")
        assert s["jpg"].shape == (96, 96, 3) and s["cls"] == y[i]
        errors.append(np.abs(s["jpg"].astype(int) - x[i].astype(int)))
    errors = np.stack(errors)
    assert 0 < errors.mean() < 3.0, errors.mean()  # lossy, but close
    assert errors.max() < 40


def test_train_shuffle_is_deterministic_per_seed_and_optional(pcam, tmp_path, capsys):
    src, data = pcam
    runs = {}
    for name, extra in {"a": (), "b": (), "seed1": ("--seed", "1"), "plain": ("--no-shuffle",)}.items():
        rc, _, err = cli(capsys, *convert_args(src, tmp_path / name, "--splits", "train,valid", *extra))
        assert rc == 0, err
        runs[name] = train_order(tmp_path / name)
    n = len(data["train"][0])
    assert runs["a"] == runs["b"] != list(range(n))
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    assert runs["seed1"] != runs["a"] and sorted(runs["seed1"]) == list(range(n))
    assert runs["plain"] == list(range(n))
    assert manifest_of(tmp_path / "plain")["splits"]["train"]["shuffled"] is False
    assert manifest_of(tmp_path / "plain")["shuffle_seed"] is None
    assert manifest_of(tmp_path / "seed1")["shuffle_seed"] == 1
    # the seed only moves the training split
    for name in ("seed1", "plain"):
        assert [s["__key__"] for s in read_webdataset(tmp_path / name, "valid")] == [
            f"valid_{i:09d}" for i in range(20)
        ]


def test_overwrite_gives_byte_identical_shards(pcam, tmp_path, capsys):
    src, _ = pcam
    out = tmp_path / "out"
    assert cli(capsys, *convert_args(src, out))[0] == 0
    first = tree_hashes(out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    rc, _, err = cli(capsys, *convert_args(src, out))  # a finished conversion is not clobbered
    assert rc == 2
    assert str(out) in err and "manifest.json" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    rc, _, err = cli(capsys, *convert_args(src, out, "--overwrite"))
    assert rc == 0, err
    assert tree_hashes(out) == first
    assert len([n for n in first if n.endswith(".tar")]) == 4 + 2 + 2


@pytest.mark.slow
def test_parallel_workers_write_the_same_bytes(pcam, tmp_path, capsys):
    src, _ = pcam
    args = ["--splits", "train", "--samples-per-shard", "20"]
    assert cli(capsys, *convert_args(src, tmp_path / "one", *args))[0] == 0
    rc, _, err = cli(capsys, *convert_args(src, tmp_path / "two", *args), "--workers", "2")  # spawned processes
    assert rc == 0, err
    assert tree_hashes(tmp_path / "one") == tree_hashes(tmp_path / "two")
    assert len(tree_hashes(tmp_path / "two")) == 3 + 1


def test_gzipped_h5_converts_like_plain_h5(tmp_path, capsys):
    sizes = {"train": 30, "valid": 10, "test": 10}
    write_pcam(tmp_path / "plain", sizes, seed=3)
    write_pcam(tmp_path / "gz", sizes, seed=3, gz=True)
    assert sorted(p.name for p in (tmp_path / "gz").iterdir() if p.suffix == ".gz") == sorted(
        pcam_name(s, p) + ".gz" for s in sizes for p in "xy"
    )
    assert cli(capsys, *convert_args(tmp_path / "plain", tmp_path / "out-plain"))[0] == 0
    rc, _, err = cli(capsys, *convert_args(tmp_path / "gz", tmp_path / "out-gz"))
    assert rc == 0, err
    plain, gz = tree_hashes(tmp_path / "out-plain"), tree_hashes(tmp_path / "out-gz")
    assert {k: v for k, v in plain.items() if k.endswith(".tar")} == {k: v for k, v in gz.items() if k.endswith(".tar")}
    m_plain, m_gz = manifest_of(tmp_path / "out-plain"), manifest_of(tmp_path / "out-gz")
    assert m_plain["splits"] == m_gz["splits"]
    assert any(f["name"].endswith(".h5.gz") for f in m_gz["source"]["files"])
    # the decompressed copies are temporary
    leftovers = [p for p in (tmp_path / "out-gz").rglob("*") if ".h5" in p.name or p.name == ".work"]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# ImageFolder and Kaggle layouts


def samples_by_source(folder: Path, split: str) -> dict[str, dict]:
    return {s["json"]["source"]: s for s in read_webdataset(folder, split)}


def test_imagefolder_with_split_folders(tmp_path, capsys):
    classes = ("stroma", "adipose", "lymph")
    items = write_imagefolder(
        tmp_path / "src", {"train": 8, "val": 3, "test": 2}, classes, split_dirs=("train", "val", "test")
    )
    out = tmp_path / "out"
    rc, _, err = cli(capsys, *convert_args(tmp_path / "src", out))
    assert rc == 0, err
    manifest = manifest_of(out)
    assert manifest["source"]["format"] == "imagefolder"
    assert manifest["label_names"] == sorted(classes)
    for split, folder in (("train", "train"), ("valid", "val"), ("test", "test")):
        expected = items[folder]
        info = manifest["splits"][split]
        assert info["num_samples"] == len(expected)
        assert info["class_counts"] == np.bincount([lab for _, lab, _ in expected], minlength=3).tolist()
        got = samples_by_source(out, split)
        assert set(got) == {str(p) for p, _, _ in expected}
        for path, label, pixels in expected:
            s = got[str(path)]
            assert s["cls"] == label, path
            np.testing.assert_array_equal(s["npy"], pixels)
        keys = [s["__key__"] for s in read_webdataset(out, split)]
        if split != "train":
            assert keys == [f"{split}_{i:09d}" for i in range(len(expected))]


def test_imagefolder_unsplit_tree_is_split_from_seed(tmp_path, capsys):
    items = write_imagefolder(tmp_path / "src", {"": 20}, ("a", "b", "c"), split_dirs=None)[""]
    all_files = {str(p) for p, _, _ in items}
    members = {}
    for name, seed in (("s0", 0), ("s0-again", 0), ("s5", 5)):
        rc, _, err = cli(capsys, *convert_args(tmp_path / "src", tmp_path / name, "--seed", str(seed)))
        assert rc == 0, err
        members[name] = {split: set(samples_by_source(tmp_path / name, split)) for split in ("train", "valid", "test")}
        parts = members[name]
        assert len(parts["valid"]) == len(parts["test"]) == 6 and len(parts["train"]) == 48
        assert (
            not (parts["train"] & parts["valid"])
            and not (parts["train"] & parts["test"])
            and not (parts["valid"] & parts["test"])
        )
        assert parts["train"] | parts["valid"] | parts["test"] == all_files
    assert members["s0"] == members["s0-again"]
    assert tree_hashes(tmp_path / "s0") == tree_hashes(tmp_path / "s0-again")
    assert members["s5"]["valid"] != members["s0"]["valid"]
    truth = {str(p): (lab, px) for p, lab, px in items}
    for split in ("train", "valid", "test"):
        for source, s in samples_by_source(tmp_path / "s0", split).items():
            assert s["cls"] == truth[source][0]
            np.testing.assert_array_equal(s["npy"], truth[source][1])
            assert items[s["json"]["source_index"]][0] == Path(source)


def test_kaggle_layout_split_from_seed(tmp_path, capsys):
    truth = write_kaggle(tmp_path / "src", n=50)
    got = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        rc, _, err = cli(capsys, *convert_args(tmp_path / "src", tmp_path / name, "--seed", str(seed)))
        assert rc == 0, err
        got[name] = {
            split: {Path(src).stem: s for src, s in samples_by_source(tmp_path / name, split).items()}
            for split in ("train", "valid", "test")
        }
    manifest = manifest_of(tmp_path / "a")
    assert manifest["source"]["format"] == "kaggle"
    assert {sp: manifest["splits"][sp]["num_samples"] for sp in manifest["splits"]} == {
        "train": 40,
        "valid": 5,
        "test": 5,
    }
    ids = [set(got["a"][sp]) for sp in ("train", "valid", "test")]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(truth)
    assert {sp: set(v) for sp, v in got["a"].items()} == {sp: set(v) for sp, v in got["b"].items()}
    assert tree_hashes(tmp_path / "a") == tree_hashes(tmp_path / "b")
    assert set(got["c"]["valid"]) != set(got["a"]["valid"])
    for split in got["a"]:
        for ident, s in got["a"][split].items():
            assert s["cls"] == truth[ident][0]
            np.testing.assert_array_equal(s["npy"], truth[ident][1])


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file, and nothing written


def pcam_small(root: Path, **kw) -> dict:
    return write_pcam(root, {"train": 20, "valid": 8, "test": 8}, **kw)


def damage_missing_file(root):
    (root / pcam_name("valid", "y")).unlink()
    return pcam_name("valid", "y")


def damage_length_mismatch(root):
    write_h5(root / pcam_name("test", "y"), "y", np.zeros((7, 1, 1, 1), np.uint8))
    return pcam_name("test", "y")


def damage_x_shape(root):
    write_h5(root / pcam_name("valid", "x"), "x", np.zeros((8, 96, 96, 4), np.uint8))
    return pcam_name("valid", "x")


def damage_x_dtype(root):
    write_h5(root / pcam_name("valid", "x"), "x", np.zeros((8, 96, 96, 3), np.float32))
    return pcam_name("valid", "x")


def damage_y_shape(root):
    write_h5(root / pcam_name("train", "y"), "y", np.zeros((20, 2), np.uint8))
    return pcam_name("train", "y")


def damage_x_not_hdf5(root):
    (root / pcam_name("test", "x")).write_bytes(b"\x89HDF" + os.urandom(3000))
    return pcam_name("test", "x")


def damage_label(root):
    y = np.zeros((8, 1, 1, 1), np.uint8)
    y[5] = 2
    write_h5(root / pcam_name("test", "y"), "y", y)
    return pcam_name("test", "y")


def damage_meta_rows(root):
    path = root / pcam_name("valid", "meta")
    path.write_text("\n".join(path.read_text().splitlines()[:-2]) + "\n")
    return pcam_name("valid", "meta")


@pytest.mark.parametrize(
    "damage",
    [
        damage_missing_file,
        damage_length_mismatch,
        damage_x_shape,
        damage_x_dtype,
        damage_y_shape,
        damage_x_not_hdf5,
        damage_label,
        damage_meta_rows,
    ],
)
def test_bad_pcam_input_is_named_and_nothing_written(tmp_path, capsys, damage):
    src, out = tmp_path / "src", tmp_path / "out"
    pcam_small(src)
    name = damage(src)
    rc, stdout, err = cli(capsys, *convert_args(src, out))
    assert rc == 2
    assert name in err, err
    assert "Traceback" not in err
    assert written(out) == []


@pytest.mark.parametrize("how", ["truncated", "random-bytes"])
def test_bad_gzip_is_named_and_temporary_files_removed(tmp_path, capsys, how):
    src, out = tmp_path / "src", tmp_path / "out"
    pcam_small(src, gz=True)
    bad = src / (pcam_name("valid", "x") + ".gz")  # after train's files were already decompressed
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if how == "truncated" else np.random.default_rng(0).bytes(len(data)))
    rc, _, err = cli(capsys, *convert_args(src, out))
    assert rc == 2
    assert bad.name in err and ("truncated" if how == "truncated" else "not a valid gzip") in err, err
    assert written(out) == []
    assert [p.name for p in out.rglob("*") if ".h5" in p.name] == [], "decompressed temp files left behind"


def test_interrupted_gzip_conversion_removes_decompressed_copies(tmp_path, capsys, monkeypatch):
    import histo_dist.convert as convert_mod

    pcam_small(tmp_path / "src", gz=True)

    def interrupted(*args):
        assert any((tmp_path / "out" / ".work").glob("*.h5"))  # decompressed while writing
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_mod, "_write_job", interrupted)
    rc, _, err = cli(capsys, *convert_args(tmp_path / "src", tmp_path / "out"))
    assert rc == 130
    assert [p.name for p in (tmp_path / "out").rglob("*") if ".h5" in p.name or p.name == ".work"] == []


def test_imagefolder_unreadable_image_is_named(tmp_path, capsys):
    items = write_imagefolder(tmp_path / "src", {"train": 6, "valid": 2, "test": 2})
    bad = items["valid"][1][0]
    bad.write_bytes(b"not a png at all" * 10)
    rc, _, err = cli(capsys, *convert_args(tmp_path / "src", tmp_path / "out"))
    assert rc == 2
    assert str(bad) in err and "cannot read image" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_imagefolder_images_of_different_sizes_are_named(tmp_path, capsys):
    items = write_imagefolder(tmp_path / "src", {"train": 6, "valid": 2, "test": 2})
    odd = items["test"][0][0]
    Image.fromarray(make_images(1, size=64)[0]).save(odd)
    rc, _, err = cli(capsys, *convert_args(tmp_path / "src", tmp_path / "out"))
    assert rc == 2
    assert str(odd) in err and "64x64" in err and "96x96" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_imagefolder_without_class_folders(tmp_path, capsys):
    (tmp_path / "src" / "train").mkdir(parents=True)
    rc, _, err = cli(capsys, *convert_args(tmp_path / "src", tmp_path / "out"))
    assert rc == 2 and str(tmp_path / "src" / "train") in err and "no class folders" in err


def test_kaggle_missing_image(tmp_path, capsys):
    truth = write_kaggle(tmp_path / "src", n=20)
    gone = sorted(truth)[3]
    (tmp_path / "src" / "train" / f"{gone}.tif").unlink()
    rc, _, err = cli(capsys, *convert_args(tmp_path / "src", tmp_path / "out"))
    assert rc == 2 and f"{gone}.tif" in err and "missing" in err
    assert written(tmp_path / "out") == []


@pytest.mark.parametrize(
    "bad_line, expect",
    [
        (None, "header"),  # columns renamed
        ("{id},2", ":5:"),  # a label outside {0, 1}, on line 5
        ("{id},", ":5:"),  # an empty label
    ],
)
def test_kaggle_bad_labels_csv(tmp_path, capsys, bad_line, expect):
    write_kaggle(tmp_path / "src", n=20)
    csv_path = tmp_path / "src" / "train_labels.csv"
    lines = csv_path.read_text().splitlines()
    if bad_line is None:
        lines[0] = "id,target"
    else:
        ident = lines[4].split(",")[0]
        lines[4] = bad_line.format(id=ident)
    csv_path.write_text("\n".join(lines) + "\n")
    rc, _, err = cli(capsys, *convert_args(tmp_path / "src", tmp_path / "out"))
    assert rc == 2
    assert "train_labels.csv" in err and expect in err, err
    assert written(tmp_path / "out") == []


def test_output_with_foreign_shards_is_refused(pcam, tmp_path, capsys):
    src, _ = pcam
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "train-000000.tar"
    foreign.write_bytes(b"someone else's data" * 100)
    rc, _, err = cli(capsys, *convert_args(src, out))
    assert rc == 2
    assert str(out) in err and "unknown origin" in err
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]
    assert foreign.read_bytes() == b"someone else's data" * 100


def test_overwrite_leaves_foreign_tar_files_alone(pcam, tmp_path, capsys):
    src, _ = pcam
    out = tmp_path / "out"
    assert cli(capsys, *convert_args(src, out))[0] == 0
    (out / "mine.tar").write_bytes(b"not from histo-dist")
    rc, _, err = cli(capsys, *convert_args(src, out, "--overwrite"))
    assert rc == 2
    assert "unknown origin" in err and "remove them" in err and "pass --overwrite" not in err
    assert (out / "mine.tar").read_bytes() == b"not from histo-dist"


def test_overwrite_with_bad_input_keeps_the_previous_conversion(pcam, tmp_path, capsys):
    """--overwrite removes the old conversion only once the new source has passed its checks."""
    src, _ = pcam
    out = tmp_path / "out"
    assert cli(capsys, *convert_args(src, out))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "camelyonpatch_level_2_split_valid_y.h5").unlink()
    rc, _, err = cli(capsys, *convert_args(bad, out, "--overwrite"))
    assert rc == 2 and "camelyonpatch_level_2_split_valid_y" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # and with a foreign shard in the folder, nothing of ours is removed either
    (out / "mine.tar").write_bytes(b"not from histo-dist")
    assert cli(capsys, *convert_args(src, out, "--overwrite"))[0] == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "mine.tar"} == before


def test_invalid_options_are_reported_together(pcam, tmp_path, capsys):
    src, _ = pcam
    rc, _, err = cli(
        capsys,
        *convert_args(
            src,
            tmp_path / "out",
            "--samples-per-shard",
            "0",
            "--valid-fraction",
            "0.6",
            "--test-fraction",
            "0.5",
            "--splits",
            "train,tset",
        ),
    )
    assert rc == 2
    for problem in ("samples_per_shard", "valid_fraction + test_fraction", "splits"):
        assert problem in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Interruption and resume


def test_interrupted_conversion_resumes_to_identical_output(pcam, tmp_path, capsys, monkeypatch):
    import histo_dist.convert as convert_mod

    src, _ = pcam
    assert cli(capsys, *convert_args(src, tmp_path / "ref"))[0] == 0

    out = tmp_path / "out"
    real_write = convert_mod._write_job
    calls = []

    def flaky(job, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job.shard)
        return real_write(job, *args)

    monkeypatch.setattr(convert_mod, "_write_job", flaky)
    rc, _, err = cli(capsys, *convert_args(src, out))
    assert rc == 130 and "interrupted" in err
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(calls)
    kept = {name: (out / name).stat().st_mtime_ns for name in calls}
    (out / ".train-000003.tar.4242.partial").write_bytes(b"half a shard")  # as a killed writer leaves it

    # a different conversion into the same folder is refused rather than mixed
    rc, _, err = cli(capsys, *convert_args(src, out, "--codec", "png"))
    assert rc == 2 and "different conversion" in err

    monkeypatch.setattr(convert_mod, "_write_job", real_write)
    rc, _, err = cli(capsys, *convert_args(src, out))
    assert rc == 0, err
    assert {name: (out / name).stat().st_mtime_ns for name in calls} == kept, "complete shards are reused"
    assert tree_hashes(out) == tree_hashes(tmp_path / "ref")
    assert sorted(p.name for p in out.iterdir()) == sorted(tree_hashes(out))
    assert cli(capsys, "verify", out, "--no-progress")[0] == 0


@pytest.mark.slow
def test_sigkill_mid_conversion_then_resume(tmp_path, capsys):
    src = tmp_path / "src"
    write_pcam(src, {"train": 400, "valid": 16, "test": 16}, meta=False)
    out = tmp_path / "out"
    args = convert_args(src, out, "--codec", "png")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "histo_dist", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("train-*.tar"))) >= 3:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"conversion ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert not (out / "manifest.json").exists()
    done = sorted(out.glob("*.tar"))
    assert 3 <= len(done) < 27
    for shard in done:  # every file under a final name is a complete shard
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for member in tar.getmembers():
                assert len(tar.extractfile(member).read()) == member.size
        assert len(names) == 16 * 3, shard.name
        assert names[-1].endswith(".png")

    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    assert cli(capsys, "verify", out, "--no-progress")[0] == 0
    assert cli(capsys, *convert_args(src, tmp_path / "ref", "--codec", "png"))[0] == 0
    assert tree_hashes(out) == tree_hashes(tmp_path / "ref")
    assert sorted(p.name for p in out.iterdir()) == sorted(tree_hashes(out))


# ---------------------------------------------------------------------------------------------
# The real data


@pytest.mark.realdata
def test_real_pcam_sample_converts_and_verifies(real_data, tmp_path, capsys):
    out = tmp_path / "real"
    rc, stdout, err = cli(
        capsys,
        "convert",
        "--input",
        real_data,
        "--output",
        out,
        "--workers",
        "1",
        "--no-progress",
        "--samples-per-shard",
        "512",
    )
    assert rc == 0, err
    manifest = manifest_of(out)
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 1200, "valid": 400, "test": 400}
    assert manifest["total_class_counts"] == [1000, 1000]
    rc, stdout, err = cli(capsys, "verify", out, "--no-progress")
    assert rc == 0, stdout + err
    assert "OK: 2000 samples verified" in stdout
    with h5py.File(real_data / pcam_name("valid", "x")) as f:
        x = f["x"][:]
    for s in read_webdataset(out, "valid"):
        np.testing.assert_array_equal(s["npy"], x[index_of(s["__key__"], "valid")])
