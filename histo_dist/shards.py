"""Samples in WebDataset tar shards: encoding, atomic writing, strict reading.

Writing uses `tarfile` (ustar, the layout `webdataset.TarWriter` writes) with a fixed mtime and
owner, so the same input gives byte-identical shards (a resumed conversion equals an uninterrupted
one). A shard is written atomically (`files.atomic_open`), hashed while written.

Reading is strict. `iter_raw_samples` (tarfile; verify, convert) raises `ShardError` naming the shard
and key for a broken tar structure. The loader instead indexes a whole shard at once
(`load_shard` + `index_shard`): local files are memory-mapped, URLs and `pipe:` commands are read
through webdataset's `gopen`; the index says where each member's bytes are, and where a damaged tar
stops being readable, so the loader can name the damage or, with skip_corrupt, count what it loses.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histo_dist.errors import HistoDistError
from histo_dist.files import atomic_open, sha256_file
from histo_dist.manifest import CODEC_EXTENSIONS, ShardInfo


class ShardError(HistoDistError):
    """A shard or a sample in it is unreadable or incomplete; the message names shard and key."""


# ---------------------------------------------------------------------------------------------
# Codecs: .npy (default: lossless, decodes in ~1 us with the header-skipping path below),
# .png (lossless, only ~1.2x smaller on real PCam tissue and ~300x slower to decode), .jpg (lossy,
# ~3x smaller). Measured by benchmarks/bench_convert.py; figures in docs/benchmarks.md.


def encode_image(image: np.ndarray, codec: str, jpeg_quality: int = 95, png_level: int = 1) -> bytes:
    if codec == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
        return buf.getvalue()
    from PIL import Image

    buf = io.BytesIO()
    if codec == "png":
        Image.fromarray(image).save(buf, format="PNG", compress_level=png_level)
    elif codec == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return buf.getvalue()


_NPY_HEADERS: dict[tuple, tuple[bytes, int]] = {}


def npy_header(shape: tuple[int, ...], dtype: str = "uint8") -> tuple[bytes, int]:
    """The exact .npy header numpy writes for a C-order array of `shape` and `dtype`, and the data size (cached)."""
    if (shape, dtype) not in _NPY_HEADERS:
        buf = io.BytesIO()
        array = np.zeros(shape, dtype)
        np.lib.format.write_array(buf, array, allow_pickle=False)
        _NPY_HEADERS[shape, dtype] = (buf.getvalue()[: -array.nbytes], array.nbytes)
    return _NPY_HEADERS[shape, dtype]


def decode_image(data: bytes | memoryview, codec: str, shape: tuple[int, ...], dtype: str = "uint8") -> np.ndarray:
    """Bytes of one image member -> uint8 (H,W,3) (or the `dtype` array of `shape`, for embeddings); raises
    ValueError when it is not that."""
    if codec == "npy":
        header, nbytes = npy_header(tuple(shape), dtype)
        # Fast path: every image of a dataset has the same header, so skip parsing it (~30x faster
        # than np.load at 96x96, where per-sample work dominates the loader). bytes(): data may be a numpy view.
        if len(data) == len(header) + nbytes and bytes(data[: len(header)]) == header:
            return np.frombuffer(data, dtype, offset=len(header)).reshape(shape)
        array = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB"))
    if array.dtype != np.dtype(dtype) or array.shape != tuple(shape):
        raise ValueError(f"array is {array.dtype} {array.shape}, expected {dtype} {tuple(shape)}")
    return array


# ---------------------------------------------------------------------------------------------
# Writing


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes and counts what passes through (sha256 without a re-read)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


def write_shard(
    path: Path,
    keys: list[str],
    images: np.ndarray,
    labels: np.ndarray,
    metas: list[dict] | None,
    codec: str,
    num_classes: int,
    jpeg_quality: int = 95,
) -> ShardInfo:
    """Write one shard atomically: temp file in the same folder, fsync, rename. Returns its info.
    Without `metas`, samples have no .json member (embeddings: the key says where each came from).

    Plain `tarfile` in ustar format, members of a sample in sorted extension order as
    `webdataset.TarWriter` writes them (importing webdataset would import torch in every
    conversion worker: seconds each). Fixed mtime and owner: identical input, identical bytes.
    """
    ext = CODEC_EXTENSIONS[codec]
    try:
        with atomic_open(path, "wb") as raw:
            hashing = _HashingFile(raw)
            with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for i, (key, image, label) in enumerate(zip(keys, images, labels)):
                    members = {"cls": str(int(label)).encode(), ext: encode_image(image, codec, jpeg_quality)}
                    if metas is not None:
                        members["json"] = json.dumps(metas[i], sort_keys=True).encode()
                    for member_ext in sorted(members):
                        info = tarfile.TarInfo(f"{key}.{member_ext}")
                        info.size, info.mtime, info.mode = len(members[member_ext]), 0, 0o444
                        info.uname = info.gname = "histo-dist"
                        tar.addfile(info, io.BytesIO(members[member_ext]))
    except OSError as e:  # a full disk or a file size limit: name the shard, keep the others
        raise ShardError(
            f"{path}: cannot write shard ({e.strerror or e}); the shards already complete are kept, "
            "run the same command again to continue"
        ) from None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return ShardInfo(path.name, len(keys), tuple(int(c) for c in counts), hashing.sha.hexdigest(), hashing.size)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]
    """Extension -> bytes, e.g. {"cls": b"1", "json": b"{...}", "npy": b"..."}."""


def iter_raw_samples(path: str | Path, fileobj=None) -> Iterator[RawSample]:
    """Group the members of a tar shard into samples by key; strict about structure.

    Raises ShardError naming the shard (and key) for a truncated or corrupt tar, a member name
    without an extension, or a key whose members are not adjacent (a key seen twice).
    """
    name = str(path)
    seen: set[str] = set()
    current: RawSample | None = None
    seekable = fileobj is None or getattr(fileobj, "seekable", lambda: False)()
    start = fileobj.tell() if fileobj is not None and seekable else 0
    try:
        with tarfile.open(name=None if fileobj else name, fileobj=fileobj, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key_part, dot, ext = base.partition(".")
                if not dot:
                    raise ShardError(
                        f"{name}: member {member.name!r} has no extension (expected KEY.cls / KEY.npy ...)"
                    )
                key = member.name[: len(member.name) - len(base)] + key_part
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardError(f"{name}: member {member.name!r} is truncated")
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    if key in seen:
                        raise ShardError(f"{name}: key {key!r} appears twice (members of a sample must be adjacent)")
                    seen.add(key)
                    current = RawSample(key, {})
                current.members[ext] = data
            end = start + tar.offset
        # tarfile ends quietly at a corrupt or cut header after the first one: check the rest of
        # the file is the end-of-archive marker (zero blocks), not more members.
        if fileobj is None:
            with open(name, "rb") as f:
                f.seek(end)
                rest = f.read()
        elif seekable:
            fileobj.seek(end)
            rest = fileobj.read()
        else:
            rest = bytes(512)  # a pipe: cannot look back
        if len(rest) < 512 or rest.count(0) != len(rest):
            raise tarfile.ReadError(f"bad or missing tar header at byte {end}")
    except (tarfile.TarError, EOFError, OSError) as e:
        where = f" after key {current.key!r}" if current is not None else ""
        raise ShardError(
            f"{name}: not a readable tar shard{where} ({type(e).__name__}: {e}); truncated or corrupt?"
        ) from None
    if current is not None:
        yield current


def decode_sample(
    sample: RawSample, shard: str, codec: str, shape: tuple[int, ...], num_classes: int, dtype: str = "uint8"
) -> tuple[np.ndarray, int]:
    """The image (or embedding) and label of a raw sample; ShardError naming shard and key when either is bad
    (an embedding must be finite)."""
    ext = CODEC_EXTENSIONS[codec]
    where = f"{shard}: sample {sample.key!r}"
    if "cls" not in sample.members:
        raise ShardError(f"{where} has no label (.cls member); members: {', '.join(sorted(sample.members))}")
    if ext not in sample.members:
        raise ShardError(f"{where} has no image (.{ext} member); members: {', '.join(sorted(sample.members))}")
    try:
        label = int(sample.members["cls"])
    except ValueError:
        raise ShardError(f"{where}: label {sample.members['cls'][:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise ShardError(f"{where}: label {label} outside 0..{num_classes - 1}")
    try:
        image = decode_image(sample.members[ext], codec, shape, dtype)
    except Exception as e:  # any decoder failure is a bad sample, named
        raise ShardError(f"{where}: cannot decode .{ext} image ({e})") from None
    if dtype != "uint8" and not np.isfinite(image).all():
        raise ShardError(f"{where}: the embedding holds NaN or inf values")
    return image, label


def read_shard_info(path: Path, num_classes: int) -> ShardInfo:
    """The info of a complete shard on disk (sample and class counts re-read, sha256): for shards a killed
    conversion or embedding left, which a rerun keeps."""
    counts = np.zeros(num_classes, dtype=np.int64)
    n = 0
    for sample in iter_raw_samples(path):
        counts[int(sample.members["cls"])] += 1
        n += 1
    return ShardInfo(path.name, n, tuple(int(c) for c in counts), sha256_file(path), path.stat().st_size)


# ---------------------------------------------------------------------------------------------
# Indexing: where every sample's members sit in a shard's bytes (the loader's read path)


@dataclass
class ShardIndex:
    """Where each sample's members sit in one shard's bytes (see `index_shard`)."""

    name: str
    data: np.ndarray
    """The whole shard as uint8: a read-only mapping of a local file, or the bytes read from a URL."""
    keys: list[str]
    members: dict[str, np.ndarray]
    """Extension -> (num_samples, 2) int64 array of [offset of the member's data, size]; -1 where absent."""
    broken: str | None = None
    """Why the tar stops being readable after the samples indexed (truncated, corrupt header, a key seen
    twice...), naming the shard; None when it is intact up to its end-of-archive marker (or the limit)."""
    more: bool = False
    """The index stopped at its `limit` and the shard holds more samples."""

    def __len__(self) -> int:
        return len(self.keys)

    def member(self, i: int, ext: str) -> np.ndarray | None:
        """The bytes of sample i's `ext` member (a view into `data`), or None when it has none."""
        offset, size = self.members[ext][i] if ext in self.members else (-1, -1)
        return None if offset < 0 else self.data[offset : offset + size]


def load_shard(url: str) -> np.ndarray:
    """A shard's bytes as uint8. Local files are memory-mapped (MAP_POPULATE: the page tables are filled
    in one go, cheaper than a page fault per 4 KiB later); URLs and `pipe:` commands are read whole
    through webdataset's `gopen`, so object stores work (a shard is ~60 MB)."""
    try:
        if "://" in url or url.startswith("pipe:"):
            import webdataset as wds

            stream = wds.gopen(url)
            try:
                return np.frombuffer(stream.read(), np.uint8)
            finally:
                stream.close()
        with open(url, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return np.empty(0, np.uint8)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            return np.frombuffer(mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ), np.uint8)
    except (OSError, ValueError) as e:
        raise ShardError(f"{url}: cannot read the shard ({type(e).__name__}: {e})") from None


def index_shard(data: np.ndarray, name: str, limit: int | None = None) -> ShardIndex:
    """Index the samples of a shard's bytes (from `load_shard`); never raises for a damaged tar.

    Damage (a truncated tar, a corrupt header, a member without extension, a key seen twice, data
    after the end-of-archive marker) ends the index there: the samples before it are indexed and
    `broken` says what is wrong, naming the shard. A sample is indexed once its members are complete,
    i.e. the next sample begins or the archive ends. With `limit`, indexing stops once `limit` samples
    are complete (`more` is then True if another one begins). Header checksums are not checked
    (`histo-dist verify` does, through tarfile, along with each shard's sha256).
    """
    if len(data) == 0:
        return ShardIndex(name, data, [], {}, broken=f"{name}: empty file, not a tar shard; truncated?")
    return _index_regular(data, name) or _index_walk(data, name, limit)


# The ustar header fields the walk needs, in one unpack: name, size, typeflag, magic, prefix.
_USTAR = struct.Struct("100s24x12s12x8xc100x5s3x32x32x16x155s12x")


def _index_walk(data: np.ndarray, name: str, limit: int | None) -> ShardIndex:
    """Header by header (one struct unpack each, ~1 us); handles any plain ustar layout."""
    size, unpack = len(data), _USTAR.unpack_from
    keys: list[str] = []
    members: dict[str, list[list[int]]] = {}
    seen: set[bytes] = set()
    pos, current_key, current, broken, more = 0, b"", None, None, False

    def close_sample():  # the sample being read is complete: add it
        keys.append(current[0])
        for ext in current[1].keys() - members.keys():
            members[ext] = [[-1, -1]] * (len(keys) - 1)
        for ext, rows in members.items():
            rows.append(current[1].get(ext, [-1, -1]))

    while True:
        if pos + 512 > size:
            broken = f"{name}: truncated tar (ends at byte {size} without the end-of-archive marker)"
            break
        if data[pos] == 0:  # end-of-archive marker (zero blocks to the end of the file)
            if data[pos:].any():
                broken = f"{name}: corrupt tar: a zero block at byte {pos} is followed by more data"
            elif current is not None:
                close_sample()
            break
        member, size_field, typeflag, magic, prefix = unpack(data, pos)
        if magic != b"ustar":
            broken = f"{name}: corrupt tar header at byte {pos} (no ustar magic); truncated or corrupt?"
            break
        try:
            member_size = int(size_field.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            broken = f"{name}: corrupt tar header at byte {pos} (bad size field)"
            break
        start = pos + 512
        pos = start + (member_size + 511) // 512 * 512
        if typeflag in (b"x", b"g", b"L", b"K"):
            broken = (
                f"{name}: extended (pax/GNU) tar header at byte {start - 512}: not read by the loader; "
                "write shards with `histo-dist convert` (plain ustar)"
            )
            break
        if typeflag not in (b"0", b"\0"):
            continue  # directories and links carry no sample data
        member = member.rstrip(b"\0")
        prefix = prefix.rstrip(b"\0")
        if prefix:
            member = prefix + b"/" + member
        shown = member.decode(errors="replace")
        if start + member_size > size:
            broken = f"{name}: member {shown!r} is truncated (shard ends at byte {size})"
            break
        dot = member.find(b".", member.rfind(b"/") + 1)
        if dot < 0:
            broken = f"{name}: member {shown!r} has no extension (expected KEY.cls / KEY.npy ...)"
            break
        key = member[:dot]
        if key != current_key:
            if current is not None:
                close_sample()
                if limit is not None and len(keys) >= limit:
                    more = True
                    break
            if key in seen:
                broken = (
                    f"{name}: key {key.decode(errors='replace')!r} appears twice (members of a sample must be adjacent)"
                )
                break
            seen.add(key)
            current, current_key = (key.decode(), {}), key
        current[1][member[dot + 1 :].decode()] = [start, member_size]
    arrays = {ext: np.asarray(rows, dtype=np.int64).reshape(-1, 2) for ext, rows in members.items()}
    return ShardIndex(name, data, keys, arrays, broken, more)


_OCTAL = 8 ** np.arange(10, -1, -1, dtype=np.int64)


def _index_regular(data: np.ndarray, name: str) -> ShardIndex | None:
    """The fast path for shards whose samples all share one block layout, as ours do (fixed-size
    .npy images, 1-block labels and metadata): guess every header's position from the first sample,
    then check all of them at once with numpy (magic, type, size, name). Any surprise returns None
    and the walk decides. ~2 us per sample instead of ~8 for the walk (benchmarks/bench_loader_stages.py)."""
    first = _index_walk(data, name, limit=1)
    if len(first) != 1 or first.broken:
        return None
    layout = sorted((offset - 512, size, ext) for ext, ((offset, size),) in first.members.items())
    exts = [ext.encode() for _, _, ext in layout]
    key = first.keys[0].encode()
    if layout[0][0] != 0 or not all(0 < b < 128 for b in key) or b"." in key:
        return None
    header_at = np.array([start for start, _, _ in layout])  # member headers relative to the sample start
    stride = int(header_at[-1]) + 512 + (layout[-1][1] + 511) // 512 * 512
    blocks = np.array([(size + 511) // 512 for _, size, _ in layout])
    if (np.diff(header_at) != 512 + 512 * blocks[:-1]).any():
        return None  # something (a directory entry?) sits between the members
    starts = np.arange(0, len(data), stride)
    ends = np.flatnonzero(data[starts] == 0)
    if not len(ends):
        return None
    n = int(ends[0])
    if n == 0 or data[n * stride :].any():
        return None

    def fields(member: int, offset: int, width: int) -> np.ndarray:  # (n, width) view, no copy
        return np.lib.stride_tricks.as_strided(data[int(header_at[member]) + offset :], (n, width), (stride, 1))

    names = [fields(m, 0, 100) for m in range(len(exts))]
    sizes = []
    for m, ext in enumerate(exts):
        tail = np.frombuffer(b"." + ext + b"\0" * 100, np.uint8)[: 100 - len(key)]
        digits = fields(m, 124, 11).astype(np.int64) - 48
        if ((digits < 0) | (digits > 7)).any():
            return None
        sizes.append(digits @ _OCTAL)
        if not (
            (fields(m, 257, 5) == np.frombuffer(b"ustar", np.uint8)).all()
            and np.isin(fields(m, 156, 1), (0, 48)).all()
            and not fields(m, 345, 1).any()
            and ((sizes[m] + 511) // 512 == blocks[m]).all()
            and (names[m][:, len(key) :] == tail).all()
            and (m == 0 or (names[m][:, : len(key)] == names[0][:, : len(key)]).all())
        ):
            return None
    key_bytes = names[0][:, : len(key)]
    if ((key_bytes == ord(".")) | (key_bytes == 0) | (key_bytes > 127)).any():
        return None
    keys = np.ascontiguousarray(key_bytes).view(f"S{len(key)}").ravel()
    if len(np.unique(keys)) != n:
        return None  # a key seen twice: the walk names it
    base = np.arange(n, dtype=np.int64) * stride
    members = {ext.decode(): np.stack([base + int(header_at[m]) + 512, sizes[m]], axis=1) for m, ext in enumerate(exts)}
    return ShardIndex(name, data, [k.decode() for k in keys.tolist()], members)
