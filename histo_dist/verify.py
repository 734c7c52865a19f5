"""Verify converted shards against their manifest: counts, checksums, and every sample decoded.

Re-reads every shard of the chosen splits: the file is there with the manifest's size and sha256,
the tar reads to the end, every sample has a label in range and an image of the manifest's shape
that decodes (embeddings: a finite float16 vector of the manifest's size), keys are unique and of
the shard's split, and sample and class counts match; tar files the manifest does not list are
reported too (shards of another conversion mixed in). Every problem is reported with its shard
and key, and the command exits non-zero when there is any.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from histo_dist.manifest import Manifest, ShardInfo


@dataclass
class ShardReport:
    name: str
    keys: list[str] = field(default_factory=list)
    class_counts: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def verify_shard(
    path: Path,
    info: ShardInfo,
    codec: str,
    shape: tuple[int, ...],
    num_classes: int,
    decode: bool = True,
    split: str | None = None,
    dtype: str = "uint8",
) -> ShardReport:
    """Check one shard (of `split`, when given); never raises for bad data, returns its problems instead."""
    from histo_dist.shards import ShardError, decode_sample, iter_raw_samples

    report = ShardReport(path.name, class_counts=[0] * num_classes)
    if not path.exists():
        report.problems.append(f"{path}: missing (listed in the manifest)")
        return report
    data = path.read_bytes()
    if len(data) != info.bytes:
        report.problems.append(f"{path}: {len(data)} bytes, manifest says {info.bytes}")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        report.problems.append(f"{path}: sha256 differs from the manifest (the file changed or is corrupt)")
    import io

    try:
        for sample in iter_raw_samples(path, fileobj=io.BytesIO(data)):
            report.keys.append(sample.key)
            try:
                if decode:
                    _, label = decode_sample(sample, str(path), codec, shape, num_classes, dtype)
                else:
                    label = int(sample.members["cls"])
                    if not 0 <= label < num_classes:  # -1 would silently count as the last class
                        raise ValueError(f"label {label} outside 0..{num_classes - 1}")
                report.class_counts[label] += 1
            except (ShardError, KeyError, ValueError, IndexError) as e:
                report.problems.append(str(e) if isinstance(e, ShardError) else f"{path}: sample {sample.key!r}: {e!r}")
    except ShardError as e:
        report.problems.append(str(e))
    foreign = [key for key in report.keys if split is not None and not key.startswith(f"{split}_")]
    if foreign:  # keys are {split}_{index:09d} (manifest.sample_key)
        report.problems.append(
            f"{path}: {len(foreign)} sample(s) not of split {split!r} (first: {foreign[0]!r}): "
            "a shard of another split or conversion"
        )
    if len(report.keys) != info.num_samples:
        report.problems.append(f"{path}: {len(report.keys)} samples, manifest says {info.num_samples}")
    if tuple(report.class_counts) != tuple(info.class_counts):
        report.problems.append(f"{path}: class counts {report.class_counts}, manifest says {list(info.class_counts)}")
    return report


def verify_dataset(
    folder: str | Path, splits: list[str] | None = None, workers: int = 1, decode: bool = True, progress: bool = False
) -> tuple[Manifest, list[str]]:
    """All problems of a converted dataset (an empty list means it verified)."""
    from tqdm import tqdm

    manifest = Manifest.load(folder)
    splits = splits or list(manifest.splits)
    problems: list[str] = []
    jobs = [(name, sh) for name in splits for sh in manifest.split(name).shards]
    args = (manifest.codec, manifest.image_shape, manifest.num_classes, decode)
    bar = tqdm(total=sum(sh.num_samples for _, sh in jobs), unit="img", desc="verify", disable=not progress)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            reports = []
            for report in pool.map(
                verify_shard,
                [manifest.root / sh.name for _, sh in jobs],
                [sh for _, sh in jobs],
                *[[a] * len(jobs) for a in args],
                [name for name, _ in jobs],
                [manifest.dtype] * len(jobs),
            ):
                reports.append(report)
                bar.update(len(report.keys))
    else:
        reports = []
        for name, sh in jobs:
            reports.append(verify_shard(manifest.root / sh.name, sh, *args, name, manifest.dtype))
            bar.update(len(reports[-1].keys))
    bar.close()
    seen: dict[str, str] = {}
    for report in reports:
        problems += report.problems
        for key in report.keys:
            if key in seen:
                problems.append(f"{manifest.root / report.name}: key {key!r} also in {seen[key]}")
            seen[key] = report.name
    listed = {sh.name for s in manifest.splits.values() for sh in s.shards}
    for stray in sorted(p.name for p in manifest.root.glob("*.tar") if p.name not in listed):
        problems.append(f"{manifest.root / stray}: a shard the manifest does not list (from another conversion?)")
    return manifest, problems


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder holding manifest.json and the shards")
    parser.add_argument("--splits", default="", help="comma-separated splits to check (default: all in the manifest)")
    parser.add_argument("--workers", type=int, default=1, help="parallel reader processes")
    parser.add_argument(
        "--no-decode",
        dest="decode",
        action="store_false",
        help="skip decoding images (checksums, structure and labels only)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] or None
    manifest, problems = verify_dataset(args.folder, splits, args.workers, args.decode, args.progress)
    for name in splits or manifest.splits:
        s = manifest.split(name)
        print(
            f"{name}: {s.num_samples} samples in {len(s.shards)} shards, class counts "
            + ", ".join(f"{label}={n}" for label, n in zip(manifest.label_names, s.class_counts))
        )
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {manifest.root}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    n = sum(manifest.split(s).num_samples for s in splits or manifest.splits)
    print(f"OK: {n} samples verified in {time.perf_counter() - t0:.1f} s ({manifest.root})")
    return 0
