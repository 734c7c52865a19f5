"""Readers for the datasets `histo-dist convert` turns into shards.

Each source is checked up front (files present, shapes, dtypes, lengths, label sets) so that bad
input fails before anything is written, and then read in slices by conversion workers:

- `pcam`: the official PatchCamelyon HDF5 files, plain `.h5` or the released `.h5.gz`, with the
  optional meta CSVs;
- `imagefolder`: torchvision ImageFolder trees (`ROOT/{train,valid,test}/{class}/*.png`, or
  `ROOT/{class}/*.png` split here from a seed), any number of classes;
- `kaggle`: the Kaggle Histopathologic Cancer Detection layout (`ROOT/train/<id>.tif` plus
  `ROOT/train_labels.csv` with `id,label`), split here from a seed.

A `SplitSource` is a small picklable description (paths and indices); `read(indices)` opens what
it needs in the calling process, so it works in spawned worker processes.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histo_dist.errors import HistoDistError
from histo_dist.files import atomic_open, sha256_file

PCAM_LABELS = ("no_tumor", "tumor")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
SPLIT_DIR_NAMES = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}


class SourceError(HistoDistError):
    """Input data that cannot be converted as it is; the message names the file and the expectation."""


@dataclass
class SplitSource:
    """One split of a source: how many samples, and how to read any of them."""

    split: str
    num_samples: int
    labels: np.ndarray
    """All labels of the split, in source order (small; read up front to count classes and check them)."""
    kind: str
    x_path: str = ""
    """pcam: the (decompressed) `_x.h5` file."""
    files: list[str] = field(default_factory=list)
    """imagefolder / kaggle: one image file per sample, in source order."""
    meta_rows: list[dict[str, str]] | None = None
    """Optional per-sample metadata (a meta CSV row), stored in each sample's json member."""
    source_indices: np.ndarray | None = None
    """Index of each sample in its original listing, when the split was drawn from a pool."""
    image_shape: tuple[int, int, int] = (96, 96, 3)

    def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Images (n,H,W,3) uint8, labels (n,) and metadata dicts for the given split positions."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.kind == "pcam":
            images = _read_h5_rows(self.x_path, indices)
        else:
            images = np.stack([load_image(self.files[i], self.image_shape) for i in indices])
        metas = []
        for i in indices:
            meta: dict = {"split": self.split, "index": int(i)}
            if self.source_indices is not None:
                meta["source_index"] = int(self.source_indices[i])
            if self.files:
                meta["source"] = self.files[i]
            if self.meta_rows is not None:
                meta["meta"] = self.meta_rows[i]
            metas.append(meta)
        return images, self.labels[indices], metas


@dataclass
class Source:
    """A whole dataset ready to convert."""

    kind: str
    root: Path
    splits: dict[str, SplitSource]
    label_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    files: list[dict]
    """The source files for the manifest: name, bytes, sha256."""
    cleanup: list[Path] = field(default_factory=list)
    """Temporary files (decompressed .h5.gz) to delete after conversion."""


# ---------------------------------------------------------------------------------------------
# Shared helpers


def file_record(path: Path, root: Path, with_hash: bool = True) -> dict:
    record = {"name": str(path.relative_to(root)), "bytes": path.stat().st_size}
    if with_hash:
        record["sha256"] = sha256_file(path)
    return record


LOSSLESS_MODES = {"RGB", "L", "1", "P"}
"""PIL modes that become 8-bit RGB exactly (grey and palette values copied); opaque RGBA, LA and PA too."""


def load_image(path: str, expected_shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Decode an image file to RGB uint8 (H,W,3) exactly as it is, or refuse it by name: unreadable, of an
    odd size, or not convertible without loss (transparent pixels, 16-bit or float values, CMYK; several
    frames or pages)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise SourceError(f"{path}: holds {frames} images (frames or pages); give one image per file")
            array = _exact_rgb(im, path)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SourceError(f"{path}: cannot read image ({e})") from None
    if expected_shape is not None and array.shape != tuple(expected_shape):
        raise SourceError(
            f"{path}: image is {array.shape[1]}x{array.shape[0]}, expected {expected_shape[1]}x{expected_shape[0]} "
            "like the other images of this dataset (all images of a dataset must have one size)"
        )
    return array


def _exact_rgb(im, path: str) -> np.ndarray:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        if np.asarray(im.getchannel("A")).min() < 255:
            raise SourceError(
                f"{path}: has transparent pixels (mode {im.mode}); flatten it onto a background first (their colour "
                "under the transparency is not the image)"
            )
    elif im.mode not in LOSSLESS_MODES:
        raise SourceError(
            f"{path}: PIL mode {im.mode} cannot become 8-bit RGB without loss (16-bit or float values would be "
            "clipped, CMYK or Lab converted without its colour profile); convert it to 8-bit RGB first"
        )
    return np.asarray(im.convert("RGB"))


def _read_h5_rows(path: str, indices: np.ndarray) -> np.ndarray:
    """Rows of dataset `x` in the given order. h5py fancy indexing wants increasing indices."""
    import h5py

    order = np.argsort(indices, kind="stable")
    with h5py.File(path, "r") as f:
        rows = (
            f["x"][indices[order]]
            if len(np.unique(indices)) == len(indices)
            else np.stack([f["x"][i] for i in indices])
        )
    out = np.empty_like(rows)
    out[order] = rows
    return out


def _split_pool(n: int, valid_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Reproducible random split of n pool items into train/valid/test index arrays (sorted)."""
    perm = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(n)
    n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
    parts = {"valid": perm[:n_valid], "test": perm[n_valid : n_valid + n_test], "train": perm[n_valid + n_test :]}
    return {k: np.sort(v) for k, v in parts.items() if len(v) > 0}


# ---------------------------------------------------------------------------------------------
# PCam HDF5


def pcam_file(root: Path, split: str, part: str) -> Path | None:
    """The x/y/meta file of a split, plain or gzipped; None when absent."""
    base = root / f"camelyonpatch_level_2_split_{split}_{part}"
    if part == "meta":
        return base.with_suffix(".csv") if base.with_suffix(".csv").exists() else None
    for candidate in (Path(f"{base}.h5"), Path(f"{base}.h5.gz")):
        if candidate.exists():
            return candidate
    return None


def gunzip_to(src: Path, dest: Path, progress: bool = True) -> Path:
    """Decompress a .h5.gz to `dest` (temp name + rename); a truncated or corrupt file is named."""
    from tqdm import tqdm

    try:
        with (
            gzip.open(src, "rb") as fin,
            atomic_open(dest, "wb") as fout,
            tqdm(
                total=src.stat().st_size,
                unit="B",
                unit_scale=True,
                desc=f"gunzip {src.name}",
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            raw = fin.fileobj  # the compressed stream, for progress in compressed bytes
            last = 0
            while block := fin.read(1 << 22):
                fout.write(block)
                pos = raw.tell()
                bar.update(pos - last)
                last = pos
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        if isinstance(e, EOFError):
            why = "it is truncated (the gzip stream ends early); download it again"
        elif isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):
            raise SourceError(f"{src}: cannot decompress to {dest.parent} ({e})") from None
        else:
            why = f"it is not a valid gzip file ({e}); download it again"
        raise SourceError(f"{src}: cannot decompress: {why}") from None
    return dest


def open_pcam(root: Path, splits: Sequence[str], work_dir: Path, progress: bool = True) -> Source:
    """Check and open the PCam files of `splits` under `root` (decompressing .h5.gz into work_dir)."""
    cleanup: list[Path] = []
    try:
        return _open_pcam(root, splits, work_dir, progress, cleanup)
    except BaseException:  # bad input found after some files were decompressed: remove those copies
        remove_files([*cleanup, work_dir])
        raise


def _open_pcam(root: Path, splits: Sequence[str], work_dir: Path, progress: bool, cleanup: list[Path]) -> Source:
    import h5py

    missing = []
    for split in splits:
        for part in ("x", "y"):
            if pcam_file(root, split, part) is None:
                missing.append(f"camelyonpatch_level_2_split_{split}_{part}.h5[.gz]")
    if missing:
        raise SourceError(
            f"{root}: missing PCam file(s): {', '.join(missing)} (expected the official file names; "
            "pass --splits to convert only some splits)"
        )

    files, split_sources = [], {}
    image_shape = None
    for split in splits:
        paths = {}
        for part in ("x", "y"):
            path = pcam_file(root, split, part)
            files.append(file_record(path, root))
            if path.suffix == ".gz":
                work_dir.mkdir(parents=True, exist_ok=True)
                path = gunzip_to(path, work_dir / path.name[: -len(".gz")], progress)
                cleanup.append(path)
            paths[part] = path
        x_len, shape = _check_pcam_h5(paths["x"], "x")
        y_len, _ = _check_pcam_h5(paths["y"], "y")
        if x_len != y_len:
            raise SourceError(f"{paths['x']} has {x_len} images but {paths['y']} has {y_len} labels: they must match")
        if image_shape is not None and shape != image_shape:
            raise SourceError(f"{paths['x']}: images are {shape}, other splits {image_shape}")
        image_shape = shape
        with h5py.File(paths["y"], "r") as f:
            labels = np.asarray(f["y"][:]).reshape(-1).astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= len(PCAM_LABELS)))
        if len(bad):
            raise SourceError(
                f"{paths['y']}: label {labels[bad[0]]} at index {bad[0]} is outside the label set "
                f"{{0: no_tumor, 1: tumor}} ({len(bad)} such labels)"
            )
        meta_rows = None
        meta_path = pcam_file(root, split, "meta")
        if meta_path is not None:
            files.append(file_record(meta_path, root))
            with open(meta_path, newline="") as f:
                meta_rows = list(csv.DictReader(f))
            if len(meta_rows) != x_len:
                raise SourceError(f"{meta_path}: {len(meta_rows)} rows, expected one per image ({x_len})")
        split_sources[split] = SplitSource(
            split=split,
            num_samples=x_len,
            labels=labels,
            kind="pcam",
            x_path=str(paths["x"]),
            meta_rows=meta_rows,
            image_shape=shape,
        )
    return Source("pcam", root, split_sources, PCAM_LABELS, image_shape, files, cleanup)


def _check_pcam_h5(path: Path, dataset: str) -> tuple[int, tuple[int, int, int]]:
    """Length and image shape of a PCam h5 file; errors say what the official layout is."""
    import h5py

    expected = "uint8 (N,96,96,3)" if dataset == "x" else "uint8 (N,1,1,1)"
    try:
        with h5py.File(path, "r") as f:
            if dataset not in f:
                raise SourceError(
                    f"{path}: no dataset '{dataset}' (found {', '.join(f.keys()) or 'none'}); expected {expected}"
                )
            d = f[dataset]
            shape, dtype = d.shape, d.dtype
    except OSError as e:
        raise SourceError(f"{path}: not a readable HDF5 file ({e}); a truncated download?") from None
    if dtype != np.uint8:
        raise SourceError(f"{path}: dataset '{dataset}' has dtype {dtype}, expected {expected}")
    if dataset == "x" and (len(shape) != 4 or shape[3] != 3):
        raise SourceError(f"{path}: dataset 'x' has shape {shape}, expected {expected}")
    if dataset == "y" and (len(shape) < 1 or int(np.prod(shape[1:])) != 1):
        raise SourceError(f"{path}: dataset 'y' has shape {shape}, expected {expected}")
    return shape[0], (tuple(shape[1:]) if dataset == "x" else ())


# ---------------------------------------------------------------------------------------------
# ImageFolder trees


def _image_files(folder: Path) -> list[Path]:
    """The images of a class folder, searched recursively. Every file there is a sample: one that is not an
    image this converter reads is refused by name, never skipped (hidden files such as .DS_Store aside)."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        raise SourceError(
            f"{others[0]}{more}: not an image file of a type histo-dist reads ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "every file in a class folder is a sample: convert it or move it out"
        )
    if not files:
        raise SourceError(
            f"{folder}: a class folder without images; a class needs samples (remove the folder, or fill it)"
        )
    return files


def open_imagefolder(root: Path, valid_fraction: float, test_fraction: float, seed: int) -> Source:
    """`ROOT/{train,valid,test}/{class}/...` (splits as given) or `ROOT/{class}/...` (split from seed)."""
    split_dirs = {}
    for split, names in SPLIT_DIR_NAMES.items():
        found = [root / name for name in names if (root / name).is_dir()]
        if len(found) > 1:
            raise SourceError(f"{root}: {' and '.join(p.name for p in found)} are both the {split} split; keep one")
        if found:
            split_dirs[split] = found[0]
    if split_dirs and "train" not in split_dirs:
        raise SourceError(f"{root}: has {', '.join(str(p.name) for p in split_dirs.values())} but no train/ folder")
    if split_dirs:
        known = {name for names in SPLIT_DIR_NAMES.values() for name in names}
        other = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in known and p.name[0] != ".")
        if other:
            raise SourceError(
                f"{root}: folder(s) {', '.join(other)} beside the split folders would not be converted; splits are "
                f"{', '.join(sorted(known))}"
            )
    class_root = split_dirs.get("train", root)
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(
            f"{class_root}: no class folders; expected an ImageFolder tree ROOT/[train/]<class>/<image files>"
        )

    def listing(folder: Path) -> tuple[list[str], list[int]]:
        files, labels = [], []
        extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes and p.name[0] != ".")
        if extra:
            raise SourceError(
                f"{folder}: class folder(s) {', '.join(extra)} are not among the train classes {', '.join(classes)}"
            )
        loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if loose:
            raise SourceError(
                f"{folder / loose[0]}{f' (and {len(loose) - 1} more)' if len(loose) > 1 else ''}: an image outside "
                "the class folders has no label; move it into its class folder"
            )
        for label, name in enumerate(classes):
            if (folder / name).is_dir():
                found = _image_files(folder / name)
                files += [str(p) for p in found]
                labels += [label] * len(found)
        if not files:
            raise SourceError(f"{folder}: no class folders with images ({', '.join(classes)} expected)")
        return files, labels

    if split_dirs:
        splits = {split: listing(folder) for split, folder in split_dirs.items()}
        pool_indices = None
    else:
        files, labels = listing(root)
        pool_indices = _split_pool(len(files), valid_fraction, test_fraction, seed)
        splits = {s: ([files[i] for i in idx], [labels[i] for i in idx]) for s, idx in pool_indices.items()}

    first = next(iter(splits.values()))[0][0]
    shape = load_image(first).shape
    split_sources = {
        split: SplitSource(
            split=split,
            num_samples=len(files),
            labels=np.asarray(labels, dtype=np.int64),
            kind="imagefolder",
            files=files,
            image_shape=shape,
            source_indices=None if pool_indices is None else pool_indices[split],
        )
        for split, (files, labels) in splits.items()
    }
    all_files = [Path(f) for s in split_sources.values() for f in s.files]
    return Source("imagefolder", root, split_sources, tuple(classes), shape, [_listing_record(all_files, root)])


def _listing_record(paths: list[Path], root: Path) -> dict:
    """One manifest record for a tree of many image files: count, total bytes, hash of the listing."""
    h = hashlib.sha256()
    total = 0
    for p in sorted(paths):
        size = p.stat().st_size
        total += size
        h.update(f"{p.relative_to(root)}\t{size}\n".encode())
    return {"name": f"{len(paths)} image files", "bytes": total, "listing_sha256": h.hexdigest()}


# ---------------------------------------------------------------------------------------------
# Kaggle Histopathologic Cancer Detection


def open_kaggle(root: Path, valid_fraction: float, test_fraction: float, seed: int) -> Source:
    """`ROOT/train_labels.csv` (id,label) with `ROOT/train/<id>.tif`; split here from a seed."""
    labels_csv = root / "train_labels.csv"
    if not labels_csv.exists():
        raise SourceError(
            f"{root}: no train_labels.csv; expected the Kaggle layout ROOT/train_labels.csv + ROOT/train/<id>.tif"
        )
    image_dir = root / "train" if (root / "train").is_dir() else root
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"id", "label"} <= set(reader.fieldnames):
            raise SourceError(f"{labels_csv}: header is {reader.fieldnames}, expected columns id,label")
        rows = list(reader)
    if not rows:
        raise SourceError(f"{labels_csv}: no rows")
    ids, labels, seen = [], [], set()
    for line, row in enumerate(rows, start=2):
        if row["id"] in seen:
            raise SourceError(f"{labels_csv}:{line}: id {row['id']} appears twice")
        seen.add(row["id"])
        if row["label"] not in ("0", "1"):
            raise SourceError(f"{labels_csv}:{line}: label {row['label']!r} for id {row['id']}, expected 0 or 1")
        ids.append(row["id"])
        labels.append(int(row["label"]))
    files = [image_dir / f"{i}.tif" for i in ids]
    missing = [p for p in files if not p.exists()]
    if missing:
        raise SourceError(
            f"{image_dir}: {len(missing)} image(s) listed in {labels_csv.name} are missing, e.g. {missing[0].name}"
        )
    shape = load_image(str(files[0])).shape
    pool = _split_pool(len(files), valid_fraction, test_fraction, seed)
    split_sources = {
        split: SplitSource(
            split=split,
            num_samples=len(idx),
            labels=np.asarray(labels, dtype=np.int64)[idx],
            kind="kaggle",
            files=[str(files[i]) for i in idx],
            source_indices=idx,
            image_shape=shape,
        )
        for split, idx in pool.items()
    }
    records = [file_record(labels_csv, root), _listing_record(files, root)]
    return Source("kaggle", root, split_sources, PCAM_LABELS, shape, records)


def detect_format(root: Path) -> str:
    """Guess the source format of a folder: pcam, kaggle or imagefolder."""
    if any(root.glob("camelyonpatch_level_2_split_*_x.h5*")):
        return "pcam"
    if (root / "train_labels.csv").exists():
        return "kaggle"
    return "imagefolder"


def remove_files(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
