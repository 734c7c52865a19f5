"""The loader's shard index: the vectorised fast path must agree with the header-by-header walk on
every shard, good or damaged, and fall back to it whenever the layout is not regular."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histo_dist.manifest import sample_key
from histo_dist.shards import _index_regular, _index_walk, index_shard, load_shard, write_shard
from tests.shard_data import encoded_image, label_of, member_offset, rewrite_shard

N = 12


def shard(tmp_path: Path, codec: str = "npy", metas=None, name: str = "train-000000.tar") -> Path:
    path = tmp_path / name
    write_shard(
        path,
        [sample_key("train", i) for i in range(N)],
        np.stack([encoded_image(i) for i in range(N)]),
        np.array([label_of(i) for i in range(N)]),
        metas or [{"index": i} for i in range(N)],
        codec,
        2,
    )
    return path


def as_tuple(index) -> tuple:
    return index.keys, {ext: rows.tolist() for ext, rows in index.members.items()}, index.broken, index.more


@pytest.mark.parametrize("codec", ["npy", "png"])  # png: sizes differ, blocks (8x8 images: one) do not
def test_fast_path_equals_the_walk_on_a_written_shard(tmp_path, codec):
    path = shard(tmp_path, codec)
    data = load_shard(str(path))
    fast = _index_regular(data, str(path))
    assert fast is not None
    assert as_tuple(fast) == as_tuple(_index_walk(data, str(path), None))
    assert fast.keys == [sample_key("train", i) for i in range(N)]
    for i in range(N):  # the offsets point at the members' bytes
        offset, size = member_offset(path, f"{fast.keys[i]}.cls")
        assert fast.members["cls"][i].tolist() == [offset, size]
        assert bytes(fast.member(i, "cls")) == str(label_of(i)).encode()


@pytest.mark.parametrize("irregular", ["metadata crosses a block", "a sample lacks a member"])
def test_irregular_layouts_fall_back_to_the_walk(tmp_path, irregular):
    if irregular == "metadata crosses a block":
        path = shard(tmp_path, metas=[{"index": i, "note": "x" * (600 if i == 5 else 1)} for i in range(N)])
    else:
        path = shard(tmp_path)
        rewrite_shard(path, lambda name, data: None if name == f"{sample_key('train', 7)}.json" else data)
    data = load_shard(str(path))
    assert _index_regular(data, str(path)) is None
    index = index_shard(data, str(path))
    assert index.broken is None and len(index) == N
    if irregular == "a sample lacks a member":
        assert index.members["json"][7].tolist() == [-1, -1] and index.member(7, "json") is None
        assert index.member(8, "json") is not None


def overwrite(path: Path, offset: int, new: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    path.write_bytes(bytes(data))


def header_of(path: Path, member: str) -> int:
    return member_offset(path, member)[0] - 512


KEY = sample_key("train", 6)
DAMAGE = {
    "size field not octal": lambda p: overwrite(p, header_of(p, f"{KEY}.json") + 124, b"0000000009"),
    "size field grown by a block": lambda p: overwrite(p, header_of(p, f"{KEY}.json") + 124, b"00000001041"),
    "magic gone": lambda p: overwrite(p, header_of(p, f"{KEY}.npy") + 257, b"xxxxx"),
    "key seen twice": lambda p: overwrite(p, header_of(p, f"{sample_key('train', 9)}.cls"), f"{KEY}.cls".encode()),
    "members of two keys mixed": lambda p: overwrite(
        p, header_of(p, f"{KEY}.npy"), f"{sample_key('train', 5)}.npy".encode()
    ),
    "a member without extension": lambda p: overwrite(p, header_of(p, f"{KEY}.json"), KEY.encode() + b"\0json"),
    "data after the end marker": lambda p: p.write_bytes(p.read_bytes() + b"\1" * 512),
    "truncated inside an image": lambda p: p.write_bytes(p.read_bytes()[: member_offset(p, f"{KEY}.npy")[0] + 100]),
    "end marker missing": lambda p: p.write_bytes(
        p.read_bytes()[: member_offset(p, f"{sample_key('train', N - 1)}.npy")[0] + 512]
    ),  # cut after the last image (1 block)
    "directory entry among the samples": None,  # built below: a valid tar, a layout the fast path cannot guess
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_fast_path_never_accepts_what_the_walk_would_not(tmp_path, damage):
    path = shard(tmp_path)
    if damage == "directory entry among the samples":
        import tarfile

        data = bytearray(path.read_bytes())
        at = header_of(path, f"{KEY}.cls")
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        path.write_bytes(bytes(data[:at]) + info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(data[at:-512]))
    else:
        DAMAGE[damage](path)
    data = load_shard(str(path))
    walked = _index_walk(data, str(path), None)
    assert as_tuple(index_shard(data, str(path))) == as_tuple(walked)
    if damage == "directory entry among the samples":
        assert walked.broken is None and len(walked) == N  # a tar other tools may write: read, not refused
    else:  # the samples up to the damage are indexed, and the problem names the shard
        assert walked.broken is not None and str(path) in walked.broken
        assert len(walked) < N


def test_limit_stops_early_and_says_there_is_more(tmp_path):
    path = shard(tmp_path)
    data = load_shard(str(path))
    index = _index_walk(data, str(path), limit=5)
    assert len(index) == 5 and index.more and index.broken is None
    whole = _index_walk(data, str(path), limit=N)
    assert len(whole) == N and not whole.more and whole.broken is None


def test_unreadable_and_empty_files_are_named(tmp_path):
    from histo_dist.shards import ShardError

    with pytest.raises(ShardError, match="missing.tar: cannot read the shard"):
        load_shard(str(tmp_path / "missing.tar"))
    (tmp_path / "empty.tar").write_bytes(b"")
    index = index_shard(load_shard(str(tmp_path / "empty.tar")), "empty.tar")
    assert len(index) == 0 and "empty.tar: empty file" in index.broken
