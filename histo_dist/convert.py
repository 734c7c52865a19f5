"""Convert PCam HDF5 (or an ImageFolder tree, or the Kaggle layout) into WebDataset tar shards.

Writes `{split}-000000.tar, ...` and one `manifest.json` per output folder. Every shard is written
under a temp name and renamed when complete, and the manifest is written last, so a conversion
killed at any point leaves no incomplete shard under a final name and no manifest claiming what
is not there. Running the same command again resumes: shards already complete are kept (checked
against the plan saved in `.convert-plan.json`), the rest are written.

`--part i/n` splits one conversion over n processes or SLURM array tasks (slurm/convert.sbatch):
each writes only every n-th shard of the plan and no manifest; the same command without --part,
run afterwards, keeps their shards and writes the manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import numpy as np

from histo_dist import __version__
from histo_dist.config import add_dataclass_arguments, from_namespace
from histo_dist.errors import HistoDistError
from histo_dist.files import check_input, check_output, write_atomic
from histo_dist.manifest import (
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ShardInfo,
    SplitInfo,
    sample_key,
    shard_name,
)
from histo_dist.sources import (
    Source,
    SplitSource,
    detect_format,
    open_imagefolder,
    open_kaggle,
    open_pcam,
    remove_files,
)

PLAN_NAME = ".convert-plan.json"
WORK_DIR = ".work"
OUR_FILES = re.compile(
    r"^(?:(?:train|valid|test)-\d{6}\.tar|manifest\.json|\.(?:convert|embed)-plan\.json|\..*\.partial)$"
)


@dataclass
class ConvertConfig:
    input: str
    """Folder holding the source data (PCam .h5/.h5.gz files, an ImageFolder tree, or the Kaggle layout)."""
    output: str = ""
    """Folder for shards and manifest.json; empty means shards/<name of the input folder>."""
    format: Literal["auto", "pcam", "imagefolder", "kaggle"] = "auto"
    """Source layout; auto detects PCam file names, then train_labels.csv (Kaggle), else ImageFolder."""
    splits: str = "train,valid,test"
    """PCam only: comma-separated splits to convert (all three files of each must be present)."""
    samples_per_shard: int = 2048
    """Samples per tar shard (the last shard of a split holds the rest). 2048 npy patches ~ 58 MB."""
    codec: Literal["npy", "png", "jpeg"] = "npy"
    """Image encoding: npy (lossless, fastest to read: the default), png (lossless, smaller), jpeg (lossy)."""
    jpeg_quality: int = 95
    """JPEG quality (1-95) when codec is jpeg."""
    shuffle: bool = True
    """Shuffle the training split at write time (from --seed), so streaming reads are well mixed."""
    seed: int = 0
    """Seed of the write-time shuffle and of the train/valid/test split for Kaggle and unsplit ImageFolder data."""
    valid_fraction: float = 0.1
    """Kaggle / unsplit ImageFolder: fraction of samples drawn into the validation split."""
    test_fraction: float = 0.1
    """Kaggle / unsplit ImageFolder: fraction of samples drawn into the test split."""
    workers: int = 0
    """Parallel writer processes; 0 means one per CPU core (at most 8)."""
    overwrite: bool = False
    """Replace an existing conversion in the output folder."""
    progress: bool = True
    """Show progress bars."""
    part: str = ""
    """Array-job slice 'i/n' (e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT): write only the shards at
    positions i, i+n, i+2n, ... of the plan, and no manifest (tasks may share the output folder); the same
    command without --part, run afterwards, keeps those shards and writes the manifest."""

    def validate(self) -> list[str]:
        problems = []
        if self.samples_per_shard < 1:
            problems.append(f"samples_per_shard: must be >= 1, got {self.samples_per_shard}")
        if not 1 <= self.jpeg_quality <= 95:
            problems.append(f"jpeg_quality: must be in 1..95, got {self.jpeg_quality}")
        for name in ("valid_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            problems.append("valid_fraction + test_fraction: must leave samples for training (sum < 1)")
        if self.workers < 0:
            problems.append(f"workers: must be >= 0, got {self.workers}")
        if self.part:
            if self.part_slice is None:
                problems.append(f"part: must be 'i/n' with 0 <= i < n, got {self.part!r}")
            elif self.overwrite:
                problems.append(
                    "part: cannot be combined with overwrite (each task would remove the shards of the "
                    "others); clear the output folder before submitting the tasks"
                )
        bad = [s for s in self.split_list if s not in SPLITS]
        if bad or not self.split_list:
            problems.append(f"splits: {self.splits!r} must be a comma-separated subset of {','.join(SPLITS)}")
        return problems

    @property
    def part_slice(self) -> tuple[int, int] | None:
        """(i, n) of --part i/n; None without --part (or when malformed: validate() says so)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", self.part)
        if not m or not 0 <= int(m[1]) < int(m[2]):
            return None
        return int(m[1]), int(m[2])

    @property
    def split_list(self) -> list[str]:
        return [s.strip() for s in self.splits.split(",") if s.strip()]


# ---------------------------------------------------------------------------------------------
# Plan: which source samples go into which shard. Pure function of the source and the config.


@dataclass
class ShardJob:
    split: SplitSource
    shard: str
    indices: np.ndarray
    """Positions in the source split, in the order they are written."""


def plan_shards(source: Source, cfg: ConvertConfig) -> list[ShardJob]:
    jobs = []
    for split_name, split in source.splits.items():
        order = np.arange(split.num_samples)
        if cfg.shuffle and split_name == "train":
            order = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5A4D])).permutation(split.num_samples)
        for i, start in enumerate(range(0, split.num_samples, cfg.samples_per_shard)):
            jobs.append(ShardJob(split, shard_name(split_name, i), order[start : start + cfg.samples_per_shard]))
    return jobs


def plan_fingerprint(source: Source, cfg: ConvertConfig, jobs: list[ShardJob]) -> dict:
    """What must be equal for a re-run to reuse shards already written."""
    return {
        "created_by": f"histo-dist {__version__}",
        "source_format": source.kind,
        "source_files": source.files,
        "codec": cfg.codec,
        "jpeg_quality": cfg.jpeg_quality if cfg.codec == "jpeg" else None,
        "samples_per_shard": cfg.samples_per_shard,
        "shuffle": cfg.shuffle,
        "seed": cfg.seed,
        "splits": {name: s.num_samples for name, s in source.splits.items()},
        "fractions": [cfg.valid_fraction, cfg.test_fraction] if source.kind != "pcam" else None,
        "shards": [job.shard for job in jobs],
    }


# ---------------------------------------------------------------------------------------------
# Work done per shard (in a worker process)


def _write_job(job: ShardJob, output: str, codec: str, num_classes: int, jpeg_quality: int) -> ShardInfo:
    from histo_dist.shards import write_shard

    images, labels, metas = job.split.read(job.indices)
    keys = [sample_key(job.split.split, int(i)) for i in job.indices]
    return write_shard(Path(output) / job.shard, keys, images, labels, metas, codec, num_classes, jpeg_quality)


# ---------------------------------------------------------------------------------------------
# The command


def refuse_finished(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a finished conversion unless --overwrite (checked before reading anything)."""
    out.mkdir(parents=True, exist_ok=True)
    if not overwrite and (out / MANIFEST_NAME).exists():
        raise HistoDistError(
            f"{out}: already holds a finished conversion ({MANIFEST_NAME}); pass --overwrite to replace it "
            "or choose another --output"
        )


def remove_previous(out: Path, keep: Path) -> None:
    """--overwrite: remove the previous conversion's files (only ours), once the new source has passed
    its checks, so bad input never costs the old conversion. `keep` is this run's work folder."""
    foreign = [p for p in out.glob("*.tar") if not OUR_FILES.match(p.name)]
    if foreign:  # refused before anything is removed
        raise HistoDistError(
            f"{out}: holds {len(foreign)} shard(s) from shards of unknown origin (e.g. {foreign[0].name}); remove "
            "them (--overwrite only removes files named like this tool's) or choose another --output"
        )
    ours = [p for p in out.iterdir() if OUR_FILES.match(p.name)]
    stale_work = [p for p in [out / WORK_DIR, *out.glob(f"{WORK_DIR}-part*")] if p != keep]
    remove_files(ours + stale_work)


def resumable_shards(
    out: Path, fingerprint: dict, overwrite: bool, plan_name: str = PLAN_NAME, what: str = "conversion"
) -> set[str]:
    """Names of complete shards a previous run of this same plan (saved in `plan_name`) left; error for foreign
    shards (`what` names the kind of run in it)."""
    plan_path = out / plan_name
    tars = {p.name for p in out.glob("*.tar")}
    if not tars:
        return set()
    old = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if old != fingerprint:
        what = f"a different {what} (other source or options)" if old else "shards of unknown origin"
        fix = (
            "remove them (--overwrite only removes files named like this tool's)"
            if overwrite
            else "pass --overwrite to replace them"
        )
        raise HistoDistError(f"{out}: holds {len(tars)} shard(s) from {what}; {fix} or choose another --output")
    return tars & set(fingerprint["shards"])


@dataclass
class ConvertReport:
    """What a conversion did, for its summary line."""

    out: Path
    manifest: Manifest | None
    """None for one --part of an array job: a part writes shards only."""
    shards: int
    """Shards of the whole conversion."""
    complete: int
    """Of them, complete after this call (this part's with --part)."""
    written: int
    """Written by this call (the others were kept from an interrupted run)."""
    images: int
    seconds: float

    def summary(self, part: tuple[int, int] | None) -> str:
        if self.manifest is None:
            return (
                f"part {part[0]}/{part[1]}: {self.complete} of {self.shards} shards complete in {self.out} "
                f"({self.written} written now); run the same command without --part to write the manifest"
            )
        shard_bytes = sum(s.bytes for sp in self.manifest.splits.values() for s in sp.shards)
        return (
            f"converted {self.images} images in {self.seconds:.1f} s ({self.images / self.seconds:.0f} img/s), "
            f"{self.shards} shards, {shard_bytes / max(self.images, 1):.0f} bytes/image ({self.manifest.codec}) "
            f"-> {self.out / MANIFEST_NAME}"
        )


def convert(cfg: ConvertConfig) -> ConvertReport:
    """Convert (with --part: write this part's shards only, no manifest)."""
    in_root = check_input(cfg.input, "--input", "folder")
    out = check_output(cfg.output or Path("shards") / in_root.resolve().name, "--output", "folder")
    refuse_finished(out, cfg.overwrite)
    part = cfg.part_slice if cfg.part else None
    work_dir = out / (WORK_DIR if part is None else f"{WORK_DIR}-part{part[0]}of{part[1]}")  # one per task

    kind = detect_format(in_root) if cfg.format == "auto" else cfg.format
    t0 = time.perf_counter()
    try:
        if kind == "pcam":
            source = open_pcam(in_root, cfg.split_list, work_dir, cfg.progress)
        elif kind == "imagefolder":
            source = open_imagefolder(in_root, cfg.valid_fraction, cfg.test_fraction, cfg.seed)
        else:
            source = open_kaggle(in_root, cfg.valid_fraction, cfg.test_fraction, cfg.seed)
    except OSError as e:  # a folder or file of the input that cannot be listed or read
        raise HistoDistError(f"{e.filename or in_root}: cannot read ({e.strerror or e})") from None
    try:
        if cfg.overwrite:
            remove_previous(out, keep=work_dir)
        return _convert_source(cfg, source, in_root, out, kind, t0)
    finally:  # decompressed .h5 copies are temporary, also when writing fails or is interrupted
        remove_files([work_dir, *source.cleanup])


def _convert_source(
    cfg: ConvertConfig, source: Source, in_root: Path, out: Path, kind: str, t0: float
) -> ConvertReport:
    from tqdm import tqdm

    num_classes = len(source.label_names)

    jobs = plan_shards(source, cfg)
    fingerprint = plan_fingerprint(source, cfg, jobs)
    done = resumable_shards(out, fingerprint, cfg.overwrite)
    # Parts running at once write the same bytes here; each write is an atomic rename.
    write_atomic(out / PLAN_NAME, json.dumps(fingerprint, indent=1).encode())
    part = cfg.part_slice if cfg.part else None
    mine = jobs if part is None else [job for k, job in enumerate(jobs) if k % part[1] == part[0]]
    if part is None:
        remove_files([p for p in out.glob(".*.partial")])  # temp files of a killed run
    else:  # only this part's: other parts may be writing theirs right now
        remove_files([p for job in mine for p in out.glob(f".{job.shard}.*.partial")])

    from histo_dist.shards import read_shard_info

    infos: dict[str, ShardInfo] = {}
    for job in mine:
        if job.shard in done:
            infos[job.shard] = read_shard_info(out / job.shard, num_classes)
    todo = [job for job in mine if job.shard not in done]
    total = sum(len(job.indices) for job in mine)
    workers = cfg.workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=total, unit="img", desc=f"convert {kind} -> {out}", disable=not cfg.progress)
    bar.update(total - sum(len(j.indices) for j in todo))
    args = (str(out), cfg.codec, num_classes, cfg.jpeg_quality)
    if workers == 1 or len(todo) <= 1:
        for job in todo:
            infos[job.shard] = _write_job(job, *args)
            bar.update(len(job.indices))
    else:
        # spawn, not fork: h5py and torch state must not be shared with the children.
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_write_job, job, *args) for job in todo]
            try:
                for future in as_completed(futures):
                    info = future.result()
                    infos[info.name] = info
                    bar.update(info.num_samples)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # no new shards after the first error
                raise
    bar.close()
    if part is not None:
        return ConvertReport(out, None, len(jobs), len(mine), len(todo), total, time.perf_counter() - t0)

    splits = {}
    for name, split in source.splits.items():
        shards = tuple(infos[job.shard] for job in jobs if job.split is split)
        counts = np.bincount(split.labels, minlength=num_classes)
        written = np.sum([s.class_counts for s in shards], axis=0)
        if not np.array_equal(counts, written):  # a bug or a changed source, never silently
            raise HistoDistError(f"{out}: class counts of split {name} in shards {written} != source {counts}")
        splits[name] = SplitInfo(
            split.num_samples, tuple(int(c) for c in counts), cfg.shuffle and name == "train", shards
        )
    manifest = Manifest(
        codec=cfg.codec,
        image_shape=tuple(int(d) for d in source.image_shape),
        label_names=source.label_names,
        splits=splits,
        source={"format": source.kind, "root": str(in_root.resolve()), "files": source.files},
        samples_per_shard=cfg.samples_per_shard,
        shuffle_seed=cfg.seed if cfg.shuffle else None,
        created_by=f"histo-dist {__version__}",
        root=out,
    )
    manifest.save(out)  # last: only now does the folder claim to hold a dataset
    remove_files([out / PLAN_NAME, out / WORK_DIR, *out.glob(f"{WORK_DIR}-part*"), *source.cleanup])

    return ConvertReport(out, manifest, len(jobs), len(jobs), len(todo), total, time.perf_counter() - t0)


def configure(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, ConvertConfig, required=["input"])


def run(args: argparse.Namespace) -> int:
    cfg = from_namespace(ConvertConfig, args)
    print(convert(cfg).summary(cfg.part_slice if cfg.part else None))
    return 0
