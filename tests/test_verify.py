"""`histo-dist verify`: a good conversion passes; each kind of damage is found and named."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from histo_dist.cli import main
from histo_dist.verify import verify_dataset
from tests.shard_data import member_offset, rewrite_shard
from tests.source_data import cli, convert_args, write_pcam


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{codec: folder} of good conversions of one small PCam set (copy before damaging)."""
    root = tmp_path_factory.mktemp("verify")
    write_pcam(root / "src", {"train": 40, "valid": 16, "test": 16})
    out = {}
    for codec in ("npy", "png"):
        out[codec] = root / codec
        assert main(convert_args(root / "src", out[codec], "--codec", codec)) == 0
    return out


@pytest.fixture
def dataset(converted, tmp_path):
    """A fresh copy of the npy conversion."""
    return Path(shutil.copytree(converted["npy"], tmp_path / "ds"))


def problems_of(folder: Path) -> list[str]:
    return verify_dataset(folder)[1]


def test_good_conversion_verifies(converted, capsys):
    for codec, folder in converted.items():
        assert problems_of(folder) == [], codec
        rc, out, err = cli(capsys, "verify", folder, "--no-progress")
        assert rc == 0, out + err
        assert "OK: 72 samples verified" in out
        assert "train: 40 samples in 3 shards" in out


def test_parallel_and_no_decode_modes_pass(converted, capsys):
    rc, out, _ = cli(capsys, "verify", converted["npy"], "--no-progress", "--no-decode", "--splits", "valid,test")
    assert rc == 0 and "OK: 32 samples verified" in out and "train:" not in out


@pytest.mark.parametrize("cut", ["mid-member", "member-boundary", "mid-header"])
def test_truncated_shard(dataset, capsys, cut):
    shard = dataset / "train-000001.tar"
    with tarfile.open(shard) as tar:
        second_image = tar.getnames()[5]
    assert second_image.endswith(".npy")
    offset, size = member_offset(shard, second_image)
    end = {
        "mid-member": offset + size // 2,
        "member-boundary": offset + (size + 511) // 512 * 512,
        "mid-header": offset + (size + 511) // 512 * 512 + 100,
    }[cut]
    shard.write_bytes(shard.read_bytes()[:end])
    problems = problems_of(dataset)
    named = [p for p in problems if "train-000001.tar" in p]
    assert named and len(named) == len(problems)
    text = "\n".join(problems)
    assert "bytes, manifest says" in text and "sha256" in text
    assert "not a readable tar shard" in text, text
    rc, out, _ = cli(capsys, "verify", dataset, "--no-progress")
    assert rc == 1
    assert "FAILED" in out and "train-000001.tar" in out


def read_strictly(reader: str, shard: Path) -> list[tuple[str, set[str]]]:
    """(key, member extensions) of every sample, by tarfile or by the loader's index; ShardError if damaged."""
    from histo_dist.shards import ShardError, index_shard, iter_raw_samples, load_shard

    if reader == "tarfile":
        return [(s.key, set(s.members)) for s in iter_raw_samples(shard)]
    index = index_shard(load_shard(str(shard)), str(shard))
    if index.broken:
        raise ShardError(index.broken)
    return [(key, {ext for ext, rows in index.members.items() if rows[i, 0] >= 0}) for i, key in enumerate(index.keys)]


@pytest.mark.parametrize("reader", ["tarfile", "index"])
@pytest.mark.parametrize("damage", ["zeroed-header", "cut-at-member-boundary", "empty"])
def test_strict_readers_reject_silently_short_shards(dataset, reader, damage):
    """tarfile alone stops quietly at a zero block or a cut between members: the readers must not."""
    from histo_dist.shards import ShardError, iter_raw_samples

    shard = dataset / "valid-000000.tar"
    offset, _ = member_offset(shard, "valid_000000004.cls")
    data = bytearray(shard.read_bytes())
    if damage == "zeroed-header":
        data[offset - 512 : offset] = bytes(512)  # looks like an end-of-archive marker
    elif damage == "cut-at-member-boundary":
        data = data[: offset - 512]
    else:
        data = bytearray()
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="valid-000000.tar"):
        read_strictly(reader, shard)
    if reader == "tarfile":
        with pytest.raises(ShardError, match="valid-000000.tar: not a readable tar shard"):
            list(iter_raw_samples(shard, fileobj=io.BytesIO(bytes(data))))
        assert any("not a readable tar shard" in p for p in problems_of(dataset))


@pytest.mark.parametrize("reader", ["tarfile", "index"])
def test_strict_readers_read_a_good_shard(converted, reader):
    samples = read_strictly(reader, converted["npy"] / "valid-000000.tar")
    assert samples == [(f"valid_{i:09d}", {"cls", "json", "npy"}) for i in range(16)]


def test_flipped_bytes_in_npy_pixels_fail_the_checksum(dataset):
    shard = dataset / "valid-000000.tar"
    offset, size = member_offset(shard, "valid_000000003.npy")
    data = bytearray(shard.read_bytes())
    data[offset + size - 10] ^= 0xFF  # a pixel: still a valid .npy, so only the checksum can tell
    shard.write_bytes(bytes(data))
    problems = problems_of(dataset)
    assert len(problems) == 1
    assert "valid-000000.tar" in problems[0] and "sha256" in problems[0]


def test_flipped_bytes_in_npy_header_name_the_key(dataset):
    shard = dataset / "valid-000000.tar"
    offset, _ = member_offset(shard, "valid_000000005.npy")
    data = bytearray(shard.read_bytes())
    data[offset : offset + 6] = b"\x00GARBL"  # the .npy magic
    shard.write_bytes(bytes(data))
    problems = problems_of(dataset)
    assert any("valid-000000.tar" in p and "sha256" in p for p in problems)
    assert any("valid-000000.tar" in p and "'valid_000000005'" in p and "decode" in p for p in problems), problems


def test_flipped_bytes_in_png_name_the_key(converted, tmp_path):
    folder = Path(shutil.copytree(converted["png"], tmp_path / "png"))
    shard = folder / "test-000000.tar"
    offset, size = member_offset(shard, "test_000000007.png")
    data = bytearray(shard.read_bytes())
    for i in range(offset + size // 2, offset + size // 2 + 16):
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    problems = problems_of(folder)
    assert any("test-000000.tar" in p and "sha256" in p for p in problems)
    assert any("test-000000.tar" in p and "'test_000000007'" in p for p in problems), problems


def test_flipped_bytes_in_a_tar_header(dataset):
    shard = dataset / "test-000000.tar"
    offset, _ = member_offset(shard, "test_000000002.cls")
    data = bytearray(shard.read_bytes())
    data[offset - 512 + 130] ^= 0x0F  # inside the header's size field
    shard.write_bytes(bytes(data))
    problems = problems_of(dataset)
    assert problems and all("test-000000.tar" in p for p in problems)
    assert any("not a readable tar shard" in p for p in problems), problems


def test_missing_shard(dataset, capsys):
    (dataset / "train-000002.tar").unlink()
    problems = problems_of(dataset)
    assert any("train-000002.tar" in p and "missing" in p for p in problems), problems
    rc, out, _ = cli(capsys, "verify", dataset, "--no-progress")
    assert rc == 1 and "train-000002.tar" in out


def test_extra_shard_not_in_the_manifest(dataset):
    shutil.copy(dataset / "train-000000.tar", dataset / "train-000007.tar")
    problems = problems_of(dataset)
    assert len(problems) == 1
    assert "train-000007.tar" in problems[0] and "does not list" in problems[0]


def test_undecodable_image(dataset, capsys):
    shard = dataset / "train-000000.tar"
    with tarfile.open(shard) as tar:
        key = tar.getnames()[4].split(".")[0]  # the second sample (shuffled: any key)
    rewrite_shard(shard, lambda name, data: b"\x93NUMPY garbage" if name == f"{key}.npy" else data)
    problems = problems_of(dataset)
    assert any("train-000000.tar" in p and repr(key) in p and "cannot decode" in p for p in problems), problems
    rc, out, _ = cli(capsys, "verify", dataset, "--no-progress")
    assert rc == 1 and key in out


def test_sample_without_label(dataset):
    shard = dataset / "valid-000000.tar"
    rewrite_shard(shard, lambda name, data: None if name == "valid_000000009.cls" else data)
    problems = problems_of(dataset)
    assert any("valid-000000.tar" in p and "'valid_000000009'" in p and "no label" in p for p in problems), problems
    assert any("class counts" in p for p in problems)


def test_label_out_of_range(dataset):
    shard = dataset / "valid-000000.tar"
    rewrite_shard(shard, lambda name, data: b"7" if name == "valid_000000001.cls" else data)
    problems = problems_of(dataset)
    assert any("'valid_000000001'" in p and "label 7" in p for p in problems), problems


@pytest.mark.parametrize("label", [b"7", b"-1"])
def test_label_out_of_range_without_decoding(dataset, label):
    shard = dataset / "valid-000000.tar"
    rewrite_shard(shard, lambda name, data: label if name == "valid_000000001.cls" else data)
    problems = verify_dataset(dataset, decode=False)[1]
    assert any("'valid_000000001'" in p for p in problems), problems


def test_duplicate_key_across_shards(dataset):
    # test's first sample replaced by a copy of valid's first sample, key and all
    with tarfile.open(dataset / "valid-000000.tar") as tar:
        stolen = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:3]}
    shard = dataset / "test-000000.tar"
    with tarfile.open(shard) as tar:
        first_key = tar.getnames()[0].split(".")[0]
    buf = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.split(".")[0] == first_key:
                ext = m.name.split(".", 1)[1]
                m.name, data = f"valid_000000000.{ext}", stolen[ext]
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    problems = problems_of(dataset)
    assert any("'valid_000000000'" in p and "also in" in p for p in problems), problems


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    rc, _, err = cli(capsys, "verify", tmp_path, "--no-progress")
    assert rc == 2
    assert "manifest.json" in err and str(tmp_path) in err


def test_damaged_manifest_is_a_clear_error(dataset, capsys):
    data = json.loads((dataset / "manifest.json").read_text())
    data["splits"]["train"]["num_samples"] = 41
    (dataset / "manifest.json").write_text(json.dumps(data))
    rc, _, err = cli(capsys, "verify", dataset, "--no-progress")
    assert rc == 2 and "manifest.json" in err and "do not add up" in err
