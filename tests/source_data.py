"""Small source datasets in each input layout `histo-dist convert` reads, and helpers to convert and read back.

Everything here is small (tens to a few hundred 96x96 images) so the whole suite stays fast.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from histo_dist.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "pcam-real-2k"
PCAM_SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------------------------
# Images


def make_images(n: int, seed: int = 0, size: int | tuple[int, int] = 96) -> np.ndarray:
    """`n` tissue-ish uint8 RGB images: smooth colour blobs (upsampled coarse noise) plus grain.

    Smooth enough that JPEG round trips with a small error, noisy enough that images differ.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(60, 230, size=(n, 6, 6, 3)).astype(np.float32)
    smooth = np.einsum("hi,nijc,wj->nhwc", _lerp_weights(h, 6), coarse, _lerp_weights(w, 6), optimize=True)
    grain = rng.integers(-3, 4, size=smooth.shape, dtype=np.int8)
    return np.clip(smooth + grain, 0, 255).astype(np.uint8)


def _lerp_weights(size: int, knots: int) -> np.ndarray:
    """(size, knots) linear interpolation weights from `knots` evenly spaced points to `size` pixels."""
    pos = np.linspace(0, knots - 1, size)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(knots)[None, :])).astype(np.float32)


def pcam_name(split: str, part: str) -> str:
    return f"camelyonpatch_level_2_split_{split}_{part}." + ("csv" if part == "meta" else "h5")


def write_h5(path: Path, name: str, data: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data)


def gzip_file(path: Path, remove: bool = True) -> Path:
    gz = path.with_name(path.name + ".gz")
    with open(path, "rb") as fin, gzip.GzipFile(gz, "wb", mtime=0) as fout:
        shutil.copyfileobj(fin, fout)
    if remove:
        path.unlink()
    return gz


def write_pcam(
    root: Path,
    sizes: dict[str, int] | None = None,
    *,
    seed: int = 0,
    gz: bool = False,
    meta: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PCam-layout folder: per split `_x.h5` (N,96,96,3) uint8, `_y.h5` (N,1,1,1) uint8, meta CSV.

    Returns {split: (x, y)} with y flat, as the converter should read them back.
    """
    sizes = sizes or {"train": 60, "valid": 20, "test": 20}
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (split, n) in enumerate(sizes.items()):
        x = make_images(n, seed=seed * 100 + i)
        y = np.random.default_rng(seed * 100 + i + 50).integers(0, 2, size=n).astype(np.uint8)
        y[:2] = [0, 1]  # both classes present
        write_h5(root / pcam_name(split, "x"), "x", x)
        write_h5(root / pcam_name(split, "y"), "y", y.reshape(n, 1, 1, 1))
        if gz:
            gzip_file(root / pcam_name(split, "x"))
            gzip_file(root / pcam_name(split, "y"))
        if meta:
            with open(root / pcam_name(split, "meta"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
                for j in range(n):
                    w.writerow([j, 10 * j, 20 * j, bool(y[j]), bool(y[j]), f"slide_{split}_{j % 3}"])
        out[split] = (x, y)
    return out


def write_imagefolder(
    root: Path,
    counts: dict[str, int] | None = None,
    classes: tuple[str, ...] = ("adipose", "lymph", "tumor"),
    *,
    split_dirs: tuple[str, ...] | None = ("train", "valid", "test"),
    seed: int = 0,
    ext: str = ".png",
) -> dict[str, list[tuple[Path, int, np.ndarray]]]:
    """An ImageFolder tree; `split_dirs=None` writes an unsplit `ROOT/<class>/...` tree.

    `counts` is images per class per split dir (or per class for an unsplit tree). Returns
    {split dir or "": [(path, label index in sorted classes, pixels)]} in ImageFolder order.
    """
    counts = counts or {"train": 8, "valid": 3, "test": 3}
    label_of = {c: i for i, c in enumerate(sorted(classes))}
    out: dict[str, list] = {}
    for s, split in enumerate(split_dirs or ("",)):
        n = counts[split] if split else counts.get("", 20)
        items = []
        for c, cls in enumerate(sorted(classes)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            images = make_images(n, seed=seed * 1000 + s * 10 + c)
            for j, image in enumerate(images):
                path = folder / f"img_{j:04d}{ext}"
                Image.fromarray(image).save(path)
                items.append((path, label_of[cls], image))
        out[split] = items
    return out


def write_kaggle(root: Path, n: int = 50, seed: int = 0) -> dict[str, tuple[int, np.ndarray]]:
    """Kaggle layout: ROOT/train/<id>.tif and ROOT/train_labels.csv. Returns {id: (label, pixels)}."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    images = make_images(n, seed=seed)
    labels = np.random.default_rng(seed + 7).integers(0, 2, size=n)
    out = {}
    with open(root / "train_labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        for i in range(n):
            ident = hashlib.sha1(f"{seed}-{i}".encode()).hexdigest()
            Image.fromarray(images[i]).save(root / "train" / f"{ident}.tif")
            w.writerow([ident, int(labels[i])])
            out[ident] = (int(labels[i]), images[i])
    return out


# ---------------------------------------------------------------------------------------------
# Running the commands and reading results


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `histo-dist ARGV` in this process; (exit code, stdout, stderr)."""
    from histo_dist.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def convert_args(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        "convert",
        "--input",
        str(src),
        "--output",
        str(out),
        "--workers",
        "1",
        "--no-progress",
        "--samples-per-shard",
        "16",
        *extra,
    ]


def read_webdataset(folder: Path, split: str) -> list[dict]:
    """Samples of a split through plain webdataset, in the manifest's shard order."""
    import webdataset as wds

    manifest = json.loads((folder / "manifest.json").read_text())
    urls = [str(folder / sh["name"]) for sh in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"))


def tree_hashes(folder: Path) -> dict[str, str]:
    """{name: sha256} of every shard and the manifest of a conversion."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.suffix in (".tar", ".json")}


def written(folder: Path) -> list[str]:
    """Shards or manifests anywhere under `folder` (to assert a failed run wrote none)."""
    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix == ".tar" or p.name == "manifest.json"
    )
