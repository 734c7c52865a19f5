"""Samples in WebDataset tar shards: encoding, atomic writing, strict reading.

Writing uses `tarfile` (ustar, the layout `webdataset.TarWriter` writes) with a fixed mtime and
owner, so the same input gives byte-identical shards (a resumed conversion equals an uninterrupted one). A shard is written to a
temp name, hashed while written, fsynced, and only then renamed to its final name.

Reading here is strict and local (verify and the loader's fast path): a shard whose tar structure is
broken, or a sample missing its label or image, raises `ShardError` naming the shard and key.
For URLs and `pipe:` sources the loader uses `webdataset` itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from histo_dist.errors import HistoDistError
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


_NPY_HEADERS: dict[tuple[int, ...], tuple[bytes, int]] = {}


def npy_header(shape: tuple[int, ...]) -> tuple[bytes, int]:
    """The exact .npy header numpy writes for a uint8 C-order array of `shape`, and the data size (cached)."""
    if shape not in _NPY_HEADERS:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros(shape, np.uint8), allow_pickle=False)
        nbytes = int(np.prod(shape))
        _NPY_HEADERS[shape] = (buf.getvalue()[:-nbytes], nbytes)
    return _NPY_HEADERS[shape]


def decode_image(data: bytes | memoryview, codec: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Bytes of one image member -> uint8 (H,W,3); raises ValueError when it is not that."""
    if codec == "npy":
        header, nbytes = npy_header(tuple(shape))
        # Fast path: every image of a dataset has the same header, so skip parsing it (~30x faster
        # than np.load at 96x96, where per-sample work dominates the loader).
        if len(data) == len(header) + nbytes and data[: len(header)] == header:
            return np.frombuffer(data, np.uint8, offset=len(header)).reshape(shape)
        array = np.load(io.BytesIO(data), allow_pickle=False)
    else:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB"))
    if array.dtype != np.uint8 or array.shape != tuple(shape):
        raise ValueError(f"image is {array.dtype} {array.shape}, expected uint8 {tuple(shape)}")
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
    metas: list[dict],
    codec: str,
    num_classes: int,
    jpeg_quality: int = 95,
) -> ShardInfo:
    """Write one shard atomically: temp file in the same folder, fsync, rename. Returns its info.

    Plain `tarfile` in ustar format, members of a sample in sorted extension order as
    `webdataset.TarWriter` writes them (importing webdataset would import torch in every
    conversion worker: seconds each). Fixed mtime and owner: identical input, identical bytes.
    """
    ext = CODEC_EXTENSIONS[codec]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                for key, image, label, meta in zip(keys, images, labels, metas):
                    members = {
                        "cls": str(int(label)).encode(),
                        "json": json.dumps(meta, sort_keys=True).encode(),
                        ext: encode_image(image, codec, jpeg_quality),
                    }
                    for member_ext in sorted(members):
                        info = tarfile.TarInfo(f"{key}.{member_ext}")
                        info.size, info.mtime, info.mode = len(members[member_ext]), 0, 0o444
                        info.uname = info.gname = "histo-dist"
                        tar.addfile(info, io.BytesIO(members[member_ext]))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk or a file size limit: name the shard, keep the others
            raise ShardError(f"{path}: cannot write shard ({e.strerror or e}); the shards already complete are kept, "
                             "run the same command again to continue") from None
        raise
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
                    raise ShardError(f"{name}: member {member.name!r} has no extension (expected KEY.cls / KEY.npy ...)")
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
        raise ShardError(f"{name}: not a readable tar shard{where} ({type(e).__name__}: {e}); truncated or corrupt?") from None
    if current is not None:
        yield current


def decode_sample(
    sample: RawSample, shard: str, codec: str, shape: tuple[int, int, int], num_classes: int
) -> tuple[np.ndarray, int]:
    """The image and label of a raw sample; ShardError naming shard and key when either is bad."""
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
        image = decode_image(sample.members[ext], codec, shape)
    except Exception as e:  # any decoder failure is a bad sample, named
        raise ShardError(f"{where}: cannot decode .{ext} image ({e})") from None
    return image, label


# The ustar header fields the fast reader needs, in one unpack: name, size, typeflag, magic, prefix.
_USTAR = struct.Struct("100s24x12s12x8xc100x5s3x32x32x16x155s12x")


def iter_raw_samples_mmap(path: str | Path) -> Iterator[RawSample]:
    """Fast reader for local shards: parses ustar headers over an mmap, members as zero-copy views.

    `tarfile` costs ~15 us per member in Python; one struct unpack per header costs ~1 us, which is
    what lets a loader worker keep up with the disk on 96x96 patches. It handles the plain ustar
    members our writer produces; extended (pax/GNU) headers fall back to `iter_raw_samples`. Header
    checksums are not checked here (verify does, through tarfile). The returned members are
    memoryviews into the mapping: copy (or decode) them before the mapping is dropped.
    """
    import mmap

    name = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ShardError(f"{name}: empty file, not a tar shard; truncated?")
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view, unpack = memoryview(mapping), _USTAR.unpack_from
    pos, current, current_key, seen, extensions = 0, None, b"", set(), {}
    while pos + 512 <= size:
        if mapping[pos] == 0:  # end-of-archive marker (two zero blocks)
            if mapping[pos:].count(0) != size - pos:
                raise ShardError(f"{name}: corrupt tar: a zero block at byte {pos} is followed by more data")
            break
        member, size_field, typeflag, magic, prefix = unpack(mapping, pos)
        if magic != b"ustar":
            raise ShardError(f"{name}: corrupt tar header at byte {pos} (no ustar magic); truncated or corrupt?")
        try:
            member_size = int(size_field.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"{name}: corrupt tar header at byte {pos} (bad size field)") from None
        start = pos + 512
        pos = start + (member_size + 511) // 512 * 512
        if typeflag not in (b"0", b"\0"):
            if typeflag in (b"x", b"g", b"L", b"K"):
                yield from iter_raw_samples(path)  # extended headers: let tarfile do it
                return
            continue
        member = member.rstrip(b"\0")
        prefix = prefix.rstrip(b"\0")
        if prefix:
            member = prefix + b"/" + member
        if start + member_size > size:
            raise ShardError(f"{name}: member {member.decode(errors='replace')!r} is truncated (shard ends at byte {size})")
        dot = member.find(b".", member.rfind(b"/") + 1)
        if dot < 0:
            raise ShardError(f"{name}: member {member.decode(errors='replace')!r} has no extension (expected KEY.cls / KEY.npy ...)")
        key = member[:dot]
        if key != current_key:
            if current is not None:
                yield current
            if key in seen:
                raise ShardError(f"{name}: key {key.decode(errors='replace')!r} appears twice (members of a sample must be adjacent)")
            seen.add(key)
            current, current_key = RawSample(key.decode(), {}), key
        ext = member[dot + 1 :]
        ext = extensions.get(ext) or extensions.setdefault(ext, ext.decode())
        current.members[ext] = view[start : start + member_size]
    else:  # no end-of-archive marker: cut inside or right after a member
        raise ShardError(f"{name}: truncated tar (ends at byte {size} without the end-of-archive marker)")
    if current is not None:
        yield current
