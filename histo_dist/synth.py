"""Write a synthetic PatchCamelyon set (H&E-like 96x96 patches) in the exact PCam file layout.

The embedded default dataset: every other command can run on it with no download. Per split it
writes `camelyonpatch_level_2_split_{split}_x.h5` (dataset `x`, uint8, N x 96 x 96 x 3),
`..._y.h5` (dataset `y`, uint8, N x 1 x 1 x 1) and `..._meta.csv` (an unnamed index column, then
coord_y, coord_x, tumor_patch, center_tumor_patch, wsi), like the official release.

How a patch is made. Stains follow colour deconvolution (Beer-Lambert): each pixel holds an
amount of hematoxylin and of eosin, and its colour is white light absorbed by both through
per-slide stain vectors, which vary as staining batches and scanners do. Eosin comes from
fibrous stroma and cell cytoplasm; hematoxylin from nuclei, drawn as ellipses: small dark round
lymphocytes, thin stromal nuclei, and "cluster" cells whose look is set by one continuous
severity s in [0, 1] (larger, more varied, more irregular, darker and more crowded as s grows).
Fat cells and tears leave white gaps. A slight blur and sensor noise finish the patch.

Labels follow the PCam convention: a patch is tumor (1) when tumor touches its centre 32x32
region. Tumor is a cluster with s in [0.25, 1]. To make the task learnable but not trivial, as in
real data, negatives may hold tumor away from the centre (tumor_patch True, center_tumor_patch
False) or a benign reactive cluster (s in [0, 0.45]) anywhere, which overlaps the mildest tumor.
A small CNN trained briefly reaches roughly 80-90% validation accuracy.

The same seed gives byte-identical data on the same machine and numpy version; each split draws
from its own random stream, so splits never repeat each other.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

from histo_dist.errors import HistoDistError
from histo_dist.files import atomic_path, check_output

SPLITS = ("train", "valid", "test")
PATCH = 96
"""PCam patch side, in pixels."""
CENTRE = (32, 64)
"""The label region: rows and columns [32, 64) of the patch (the PCam convention)."""
META_COLUMNS = ("coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi")
"""Columns of the official PCam meta CSVs, after their unnamed index column."""

CHUNK = 64
"""Patches rendered at once: small enough for the working arrays to stay in cache."""
PATCHES_PER_SLIDE = 64
"""About this many patches share one synthetic slide (its stains, focus and tissue make-up)."""

# Patches are drawn on a slightly larger canvas and cropped, so nuclei and the blur run past the
# patch border naturally. Smooth maps are computed at half resolution (canvas pixel 2i is
# half-resolution pixel i) and upsampled: it halves the run time and they lose nothing.
PAD = 4
CANVAS = PATCH + 2 * PAD
HALF = CANVAS // 2

# Stain optical-density vectors (R, G, B absorbance per unit of stain), near the usual Macenko
# and Ruifrok references, before per-slide jitter.
HEMATOXYLIN = np.array([0.50, 0.79, 0.35])
EOSIN = np.array([0.17, 0.87, 0.46])

# Tumor clusters have severity in TUMOR_S, benign reactive clusters in REACTIVE_S; in the overlap
# [0.25, 0.45] the two look alike, which keeps accuracy below 100%.
TUMOR_S = (0.25, 1.0)
REACTIVE_S = (0.0, 0.45)
P_OFF_CENTRE_TUMOR = 0.25
"""Share of negatives with tumor in the patch but not in its centre."""
P_REACTIVE = 0.35
"""Share of negatives with a benign reactive cluster (anywhere, the centre included)."""


# ---------------------------------------------------------------------------------------------
# Configuration and command line


@dataclass
class SynthConfig:
    output: str
    """Folder to write the PCam-layout files into (created if missing)."""
    n_train: int = 2048
    """Number of training patches."""
    n_valid: int = 512
    """Number of validation patches."""
    n_test: int = 512
    """Number of test patches."""
    seed: int = 0
    """Random seed: the same seed writes identical data."""
    tumor_fraction: float = 0.5
    """Share of patches labelled tumor (PCam is balanced, 0.5)."""
    workers: int = 0
    """Threads rendering patches; 0: one per CPU core, up to 8. The output does not depend on it."""
    overwrite: bool = False
    """Replace existing PCam files in the output folder instead of refusing."""

    def validate(self) -> list[str]:
        problems = []
        if not self.output:
            problems.append("output: must be a folder path, got an empty string")
        for name in ("n_train", "n_valid", "n_test", "seed"):
            value = getattr(self, name)
            if value < 0:
                problems.append(f"{name}: must be >= 0, got {value}")
        if not 0.0 <= self.tumor_fraction <= 1.0:
            problems.append(f"tumor_fraction: must be in [0, 1], got {self.tumor_fraction}")
        if self.workers < 0:
            problems.append(f"workers: must be >= 0 (0: one per CPU core), got {self.workers}")
        return problems


def configure(parser: argparse.ArgumentParser) -> None:
    from histo_dist.config import add_dataclass_arguments

    add_dataclass_arguments(parser, SynthConfig, required=["output"])


def run(args: argparse.Namespace) -> int:
    from histo_dist.config import from_namespace

    cfg = from_namespace(SynthConfig, args)
    result = write_synthetic_pcam(cfg, progress=True)
    for split in SPLITS:
        x_path = result["files"][split]["x"]
        n, tumor = result["counts"][split], result["tumor"][split]
        print(f"{split}: {n} patches ({tumor} tumor) -> {x_path}, _y.h5, _meta.csv")
    print(f"wrote {result['total']} patches in {result['seconds']:.1f} s ({result['images_per_s']:.0f} images/s)")
    return 0


# ---------------------------------------------------------------------------------------------
# Files


def pcam_paths(folder: str | os.PathLike, split: str) -> dict[str, Path]:
    """The official PCam file names of one split: {"x", "y", "meta"} -> path."""
    stem = Path(folder) / f"camelyonpatch_level_2_split_{split}"
    return {"x": Path(f"{stem}_x.h5"), "y": Path(f"{stem}_y.h5"), "meta": Path(f"{stem}_meta.csv")}


def write_synthetic_pcam(cfg: SynthConfig, progress: bool = False) -> dict:
    """Write all three splits. Returns {"files": {split: {"x", "y", "meta"}: path}, "counts",
    "tumor" (tumor patches per split), "total", "seconds", "images_per_s"}."""
    import h5py
    from tqdm import tqdm

    out = check_output(cfg.output, "--output", "folder")
    counts = {"train": cfg.n_train, "valid": cfg.n_valid, "test": cfg.n_test}
    files = {split: pcam_paths(out, split) for split in SPLITS}
    existing = [str(p) for split in SPLITS for p in files[split].values() if p.exists()]
    if existing and not cfg.overwrite:
        raise HistoDistError(
            f"refusing to overwrite existing file(s) {', '.join(existing)}; pass --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)

    workers = cfg.workers or min(os.cpu_count() or 1, 8)
    tumor = {}
    started = time.perf_counter()
    split_streams = np.random.SeedSequence(cfg.seed).spawn(len(SPLITS))
    disable = None if progress else True  # None: tqdm shows the bar only on a terminal
    with tqdm(total=sum(counts.values()), unit="img", desc="synth", file=sys.stderr, disable=disable) as bar:
        for split, stream in zip(SPLITS, split_streams):
            n, paths = counts[split], files[split]
            meta_chunks = []
            with contextlib.ExitStack() as stack:
                tmp = {key: stack.enter_context(atomic_path(path)) for key, path in paths.items()}
                with h5py.File(tmp["x"], "w") as fx, h5py.File(tmp["y"], "w") as fy:
                    # Same layout as the official files: contiguous, uncompressed.
                    x_set = fx.create_dataset("x", shape=(n, PATCH, PATCH, 3), dtype=np.uint8)
                    y_set = fy.create_dataset("y", shape=(n, 1, 1, 1), dtype=np.uint8)
                    chunks = _generate(n, np.random.default_rng(stream), cfg.tumor_fraction, f"synth_{split}", workers)
                    for start, x, y, meta in chunks:
                        x_set[start : start + len(x)] = x
                        y_set[start : start + len(y)] = y.reshape(-1, 1, 1, 1)
                        meta_chunks.append(meta)
                        bar.update(len(x))
                meta = _concat_meta(meta_chunks)
                _write_meta_csv(tmp["meta"], meta)
            tumor[split] = int(np.count_nonzero(meta["center_tumor_patch"]))
    seconds = time.perf_counter() - started
    total = sum(counts.values())
    return {
        "files": {split: {key: str(p) for key, p in files[split].items()} for split in SPLITS},
        "counts": counts,
        "tumor": tumor,
        "total": total,
        "seconds": seconds,
        "images_per_s": total / seconds if seconds > 0 else float("inf"),
    }


def _write_meta_csv(path: Path, meta: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["", *META_COLUMNS])  # the official files start with an unnamed index column
        for i, (cy, cx, tumor_patch, centre_tumor, wsi) in enumerate(zip(*(meta[c] for c in META_COLUMNS))):
            writer.writerow([i, int(cy), int(cx), bool(tumor_patch), bool(centre_tumor), wsi])


def _concat_meta(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not chunks:
        dtypes = (np.int64, np.int64, bool, bool, object)
        return {c: np.zeros(0, dtype=t) for c, t in zip(META_COLUMNS, dtypes)}
    return {c: np.concatenate([m[c] for m in chunks]) for c in META_COLUMNS}


# ---------------------------------------------------------------------------------------------
# Patches


def make_patches(
    n: int, rng: np.random.Generator, tumor_fraction: float = 0.5, wsi_prefix: str = "synth", workers: int = 1
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """`n` synthetic patches: x uint8 (n, 96, 96, 3), y uint8 (n,), meta {column: array} as in the CSV."""
    xs, ys, metas = [], [], []
    for _, x, y, meta in _generate(n, rng, tumor_fraction, wsi_prefix, workers):
        xs.append(x)
        ys.append(y)
        metas.append(meta)
    x = np.concatenate(xs) if xs else np.zeros((0, PATCH, PATCH, 3), np.uint8)
    y = np.concatenate(ys) if ys else np.zeros(0, np.uint8)
    return x, y, _concat_meta(metas)


def _generate(
    n: int, rng: np.random.Generator, tumor_fraction: float, wsi_prefix: str, workers: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """Yield (start, x, y, meta) chunks of one split, in order.

    Split-wide draws (labels, slides) come from `rng`; each chunk then renders from its own
    stream seeded from `rng`, so chunks can render on `workers` threads (numpy releases the GIL
    in its array loops) without the output depending on how many there are."""
    n_tumor = round(n * tumor_fraction)
    labels = rng.permutation(np.repeat(np.array([1, 0], np.uint8), [n_tumor, n - n_tumor]))
    n_slides = max(1, math.ceil(n / PATCHES_PER_SLIDE))
    slides = _draw_slides(rng, n_slides)
    slide_of = rng.integers(n_slides, size=n)
    coords = rng.integers(0, 40_000, size=(n, 2))  # a patch's place on its slide: bookkeeping only
    wsi_names = np.array([f"{wsi_prefix}_{i:03d}" for i in range(n_slides)], dtype=object)
    starts = range(0, n, CHUNK)
    chunk_seeds = rng.integers(0, 2**63, size=(len(starts), 2))

    def render(i: int) -> tuple[np.ndarray, np.ndarray]:
        part = slice(starts[i], starts[i] + CHUNK)
        chunk_slides = {k: v[slide_of[part]] for k, v in slides.items()}
        return _render(np.random.default_rng(chunk_seeds[i]), labels[part], chunk_slides)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Render a few chunks ahead of the consumer, not all of them: memory stays bounded.
        futures: dict[int, Future] = {}
        for i in range(len(starts)):
            for ahead in range(i, min(i + 2 * workers, len(starts))):
                if ahead not in futures:
                    futures[ahead] = pool.submit(render, ahead)
            x, tumor_anywhere = futures.pop(i).result()
            part = slice(starts[i], starts[i] + CHUNK)
            meta = {
                "coord_y": coords[part, 0],
                "coord_x": coords[part, 1],
                "tumor_patch": tumor_anywhere,
                "center_tumor_patch": labels[part].astype(bool),
                "wsi": wsi_names[slide_of[part]],
            }
            yield starts[i], x, labels[part], meta


def _draw_slides(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per-slide stain vectors and strengths, background tint, light, focus and tissue make-up."""

    def stain(reference: np.ndarray) -> np.ndarray:
        v = np.clip(reference + rng.normal(0, 0.07, size=(n, 3)), 0.02, None)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    slides = {
        "h_vec": stain(HEMATOXYLIN),
        "e_vec": stain(EOSIN),
        "h_strength": rng.uniform(0.65, 1.2, n),
        "e_strength": rng.uniform(0.12, 0.55, n),
        "background_od": rng.uniform(0.0, 0.05, (n, 3)),  # glass and mounting medium: near white, tinted
        "light": rng.uniform(235, 252, n),
        "blur": rng.uniform(0.3, 0.8, n),
        "lymph_bias": rng.uniform(-0.2, 0.2, n),  # some nodes are more packed with lymphocytes than others
    }
    return {k: v.astype(np.float32) for k, v in slides.items()}


def _uniform(rng: np.random.Generator, low: float, high: float, shape) -> np.ndarray:
    return rng.uniform(low, high, shape).astype(np.float32)


def _render(
    rng: np.random.Generator, labels: np.ndarray, slide: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Render one chunk: uint8 patches (B, 96, 96, 3), and whether each holds tumor anywhere."""
    b = len(labels)
    fields = _noise_fields(rng, b)
    cluster, tumor_anywhere = _draw_clusters(rng, labels)

    # Tissue make-up, at half resolution: how packed with lymphocytes, and where tears leave gaps.
    lymph_density = rng.choice(np.array([0.9, 0.45, 0.1], np.float32), size=b, p=[0.4, 0.35, 0.25])
    lymph_density = np.clip(lymph_density + _uniform(rng, -0.15, 0.15, b) + slide["lymph_bias"], 0.0, 1.0)
    dense = lymph_density[:, None, None]
    # Lymphocytes gather in follicles and sheets: their local density follows a smooth field.
    lymph_local = dense * _sigmoid(2.5 * fields.low_b + 4.0 * (dense - 0.45))
    gap_fraction = np.where(rng.random(b) < 0.3, rng.uniform(0.03, 0.3, b), 0.0)
    gap_level = np.array([NormalDist().inv_cdf(f) if f > 0 else -9.0 for f in gap_fraction], np.float32)
    no_gap = np.clip((fields.low_a - gap_level[:, None, None]) / 0.3 + 0.5, 0.0, 1.0)
    in_cluster = _upsample2(_cluster_mask(cluster, fields.low_c))
    lymph_local, no_gap = _upsample2(lymph_local), _upsample2(no_gap)
    fat = _fat(rng, b, fields.low_b, lymph_density)
    tissue = np.maximum(no_gap * (1.0 - fat), in_cluster)  # tumor grows as a cohesive sheet

    nuclei = _concat_nuclei(
        _lymphocytes(rng, lymph_local, tissue, in_cluster, slide),
        _stromal_nuclei(rng, fields.fibre_angle, lymph_density, tissue, in_cluster, slide),
        _cluster_cells(rng, cluster, in_cluster, slide),
    )
    # Chromatin grain: faint in lymphocytes, coarse in severe cluster cells (the only nuclei there).
    chromatin = 0.12 + in_cluster * (0.05 + 0.4 * cluster.severity[:, None, None])
    amount = _stamp_nuclei(nuclei, b) * (1.0 + chromatin * fields.grain)
    # Overlapping nuclei darken, but not without bound (staining saturates).
    nuclei_h = 1.6 * (1.0 - np.exp(np.maximum(amount, 0.0) / -1.6))

    # Eosin: fibrous stroma, paler between packed lymphocytes, mottled cytoplasm inside clusters.
    e_strength = slide["e_strength"][:, None, None]
    fibre, mid = _upsample2(fields.fibre), _upsample2(fields.mid)
    # Collagen bundles with pale clefts where the fibre field is low.
    stroma = e_strength * _uniform(rng, 0.8, 1.3, (b, 1, 1)) * (0.8 + 0.2 * fibre) * _sigmoid(3.0 * (fibre + 0.7))
    between_lymph = stroma * (1.0 - 0.5 * lymph_local)
    cytoplasm = e_strength * (0.75 + 0.15 * mid + 0.1 * fields.grain)
    eosin = tissue * (between_lymph + (cytoplasm - between_lymph) * in_cluster)
    # A faint hematoxylin haze over tissue makes it purple-pink rather than pure pink.
    haze = (0.04 + 0.12 * lymph_local + 0.1 * in_cluster) * slide["h_strength"][:, None, None]
    hema = tissue * haze + nuclei_h

    # Focus blur; eosin is smooth already, so only hematoxylin needs it.
    hema = _blur_crop(hema, slide["blur"] * _uniform(rng, 0.9, 1.1, b))
    eosin = eosin[:, PAD:-PAD, PAD:-PAD]
    noise_std = _uniform(rng, 1.0, 3.0, (b, 1, 1))
    channels = []
    for c in range(3):  # one colour channel at a time: numpy is slow on a trailing axis of 3
        h_od, e_od, glass_od = (slide[k][:, c, None, None] for k in ("h_vec", "e_vec", "background_od"))
        od = hema * h_od + eosin * e_od + glass_od
        light = slide["light"][:, None, None] * np.exp(od * np.float32(-np.log(10.0)))
        # Sensor noise; its exact shape does not matter, and uniform noise is cheap to draw.
        noise = (rng.random(light.shape, dtype=np.float32) - 0.5) * (noise_std * np.float32(np.sqrt(12.0)))
        channels.append(np.clip(np.rint(light + noise), 0, 255).astype(np.uint8))
    return np.stack(channels, axis=-1), tumor_anywhere


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------------------------------
# Random fields: white noise filtered in the Fourier domain at half resolution


def _gaussian_filter(sigma_along: float, sigma_across: float, angle: np.ndarray) -> np.ndarray:
    """Fourier transfer function (B, HALF, HALF // 2 + 1) of a Gaussian blur elongated along
    `angle` (per patch; direction (x, y) = (cos, sin)); sigmas in half-resolution pixels."""
    fy = np.fft.fftfreq(HALF)[:, None].astype(np.float32)
    fx = np.fft.rfftfreq(HALF)[None, :].astype(np.float32)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    k_along, k_across = fx * cos + fy * sin, -fx * sin + fy * cos
    return np.exp(-2 * np.pi**2 * (sigma_along**2 * k_along**2 + sigma_across**2 * k_across**2)).astype(np.float32)


@dataclass
class _Fields:
    """Zero-mean, unit-std random fields, (B, HALF, HALF) unless said otherwise."""

    fibre: np.ndarray  # collagen streaks
    fibre_angle: np.ndarray  # (B,) their main direction: (x, y) = (cos, sin)
    mid: np.ndarray  # cell-scale mottling
    low_a: np.ndarray  # three independent tissue-scale fields
    low_b: np.ndarray
    low_c: np.ndarray
    grain: np.ndarray  # (B, CANVAS, CANVAS) pixel-scale white noise (uniform); the final blur softens it


def _noise_fields(rng: np.random.Generator, b: int) -> _Fields:
    angle = rng.uniform(0, np.pi, b)
    crossing = angle + rng.uniform(0.4, 1.2, b) * rng.choice([-1, 1], b)
    # Sigmas in half-resolution pixels (twice that on the canvas).
    transfers = [
        _gaussian_filter(3.5, 0.6, angle) + 0.6 * _gaussian_filter(2.5, 0.6, crossing),  # long fibres, some crossing
        _gaussian_filter(0.9, 0.9, angle),
        _gaussian_filter(4.5, 4.5, angle),
        _gaussian_filter(6.0, 6.0, angle),
        _gaussian_filter(2.5, 2.5, angle),
    ]
    # White noise drawn straight in the Fourier domain (one FFT instead of two); uniform noise is
    # cheaper to draw than Gaussian, and each field pixel sums many terms, so it ends up Gaussian.
    uniform = rng.random((b, len(transfers), HALF, HALF // 2 + 1, 2), dtype=np.float32) - 0.5
    spectrum = uniform.view(np.complex64)[..., 0]
    fields = np.fft.irfft2(spectrum * np.stack(transfers, axis=1), s=(HALF, HALF)).astype(np.float32)
    fields -= fields.mean(axis=(2, 3), keepdims=True)
    fields /= np.maximum(fields.std(axis=(2, 3), keepdims=True), 1e-6)
    fibre, mid, low_a, low_b, low_c = fields.transpose(1, 0, 2, 3)
    grain = (rng.random((b, CANVAS, CANVAS), dtype=np.float32) - 0.5) * np.float32(np.sqrt(12.0))
    return _Fields(fibre, angle.astype(np.float32), mid, low_a, low_b, low_c, grain)


def _upsample2(low: np.ndarray) -> np.ndarray:
    """Linear interpolation of (B, n, n) maps to (B, 2n, 2n): output pixel 2i is input pixel i."""
    b, n, _ = low.shape
    rows = np.empty((b, 2 * n, n), np.float32)
    rows[:, 0::2] = low
    rows[:, 1:-1:2] = 0.5 * (low[:, :-1] + low[:, 1:])
    rows[:, -1] = low[:, -1]
    out = np.empty((b, 2 * n, 2 * n), np.float32)
    out[:, :, 0::2] = rows
    out[:, :, 1:-1:2] = 0.5 * (rows[:, :, :-1] + rows[:, :, 1:])
    out[:, :, -1] = rows[:, :, -1]
    return out


def _blur_crop(image: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Gaussian blur (5 taps, one sigma per patch) of (B, C, C) maps, cropped to the patch."""
    taps = np.arange(-2, 3, dtype=np.float32)
    kernel = np.exp(-(taps[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel /= kernel.sum(axis=1, keepdims=True)
    lo, hi = PAD - 2, PAD + PATCH - 2
    rows = sum(kernel[:, t, None, None] * image[:, lo + t : hi + t, :] for t in range(5))
    return sum(kernel[:, t, None, None] * rows[:, :, lo + t : hi + t] for t in range(5))


# ---------------------------------------------------------------------------------------------
# Clusters: tumor (which sets the label) and benign reactive look-alikes


@dataclass
class _Clusters:
    present: np.ndarray  # (B,) bool
    cy: np.ndarray  # centre, canvas pixels
    cx: np.ndarray
    radius: np.ndarray  # mean radius R; the outline stays within [0.7 R, 1.3 R]
    severity: np.ndarray  # s in [0, 1]
    harmonics: np.ndarray  # (B, 4): a2, phase2, a3, phase3 of the outline


def _draw_clusters(rng: np.random.Generator, labels: np.ndarray) -> tuple[_Clusters, np.ndarray]:
    """At most one cluster per patch; returns them and whether each patch holds tumor anywhere."""
    b = len(labels)
    positive = labels == 1
    kind = rng.random(b)
    off_centre = ~positive & (kind < P_OFF_CENTRE_TUMOR)
    reactive = ~positive & ~off_centre & (kind < P_OFF_CENTRE_TUMOR + P_REACTIVE)
    tumor = positive | off_centre

    severity = np.where(tumor, rng.uniform(*TUMOR_S, b), rng.uniform(*REACTIVE_S, b))
    # Tumor in the centre ranges from a small nest to a sheet over the whole patch; off-centre
    # tumor must fit beside the centre region, so it stays small.
    radius = np.where(positive, np.exp(rng.uniform(np.log(10), np.log(48), b)), rng.uniform(8, 20, b))
    harmonics = np.stack(
        [rng.uniform(0, 0.12, b), rng.uniform(0, 2 * np.pi, b), rng.uniform(0, 0.12, b), rng.uniform(0, 2 * np.pi, b)],
        axis=1,
    )

    # Centres. The outline radius stays within [0.7 R, 1.3 R] (harmonics <= 0.24, fraying <= 4%),
    # so a centre within 0.6 R of the centre region puts tumor in it and one farther than 1.3 R
    # keeps it out: the labels hold by construction.
    lo, hi = PAD + CENTRE[0], PAD + CENTRE[1] - 1  # the centre region's first and last pixel
    # Positives: a point of the centre region, moved by up to 0.6 R in any direction.
    direction = rng.uniform(0, 2 * np.pi, b)
    shift = 0.6 * radius * np.sqrt(rng.random(b))
    in_centre_at = rng.uniform(lo, hi, size=(b, 2)) + (shift * np.stack([np.sin(direction), np.cos(direction)])).T
    # Off-centre tumor: the first of 32 random candidates clear of the centre region that still
    # reaches into the patch. A patch corner always fits (R <= 20); it backs up the rare miss.
    r = radius[:, None]
    candidates = rng.uniform(PAD - 10, PAD + PATCH + 10, size=(b, 32, 2))
    dist_to_centre = _distance_to_square(candidates, lo, hi)
    dist_to_patch = _distance_to_square(candidates, PAD, PAD + PATCH - 1)
    fits = (dist_to_centre > 1.3 * r + 0.5) & (dist_to_patch < 0.7 * r - 0.5)
    corner = np.array([PAD + 3.0, PAD + 3.0])
    off_centre_at = np.where(fits.any(axis=1)[:, None], candidates[np.arange(b), np.argmax(fits, axis=1)], corner)
    # Reactive clusters: anywhere.
    anywhere_at = rng.uniform(PAD + 8, PAD + PATCH - 8, size=(b, 2))
    centre = np.where(positive[:, None], in_centre_at, np.where(off_centre[:, None], off_centre_at, anywhere_at))

    clusters = _Clusters(
        present=tumor | reactive,
        cy=centre[:, 0].astype(np.float32),
        cx=centre[:, 1].astype(np.float32),
        radius=radius.astype(np.float32),
        severity=severity.astype(np.float32),
        harmonics=harmonics.astype(np.float32),
    )
    return clusters, tumor


def _distance_to_square(points: np.ndarray, first: float, last: float) -> np.ndarray:
    """Distance from points (..., 2) to the square [first, last]^2 (zero inside it)."""
    gap = np.maximum(np.maximum(first - points, points - last), 0.0)
    return np.hypot(gap[..., 0], gap[..., 1])


def _outline_scale(dy: np.ndarray, dx: np.ndarray, harmonics: np.ndarray) -> np.ndarray:
    """1 + a2 cos(2t + p2) + a3 cos(3t + p3) at the angle t of offset (dy, dx); `harmonics`
    broadcasts against dy as (..., 4). Written with cos t and sin t only: cheaper than arctan2."""
    r = np.maximum(np.sqrt(dx * dx + dy * dy), 1e-6)
    c, s = dx / r, dy / r
    cos2, sin2 = c * c - s * s, 2 * c * s
    cos3, sin3 = c * (4 * c * c - 3), s * (3 - 4 * s * s)
    a2, p2, a3, p3 = (harmonics[..., i] for i in range(4))
    return 1.0 + a2 * (cos2 * np.cos(p2) - sin2 * np.sin(p2)) + a3 * (cos3 * np.cos(p3) - sin3 * np.sin(p3))


def _cluster_mask(cl: _Clusters, roughness: np.ndarray) -> np.ndarray:
    """Soft mask (B, HALF, HALF) of each patch's cluster, zero where there is none. A smooth field
    (unit std, `roughness`) frays the outline by up to 4%."""
    mask = np.zeros_like(roughness)
    idx = np.flatnonzero(cl.present)
    grid = 2 * np.arange(HALF, dtype=np.float32)  # canvas coordinates of the half-resolution pixels
    dy = grid[None, :, None] - cl.cy[idx, None, None]
    dx = grid[None, None, :] - cl.cx[idx, None, None]
    fray = 1.0 + 0.04 * np.clip(roughness[idx], -1.0, 1.0)
    outline = cl.radius[idx, None, None] * _outline_scale(dy, dx, cl.harmonics[idx, None, None, :]) * fray
    mask[idx] = np.clip((outline - np.sqrt(dx * dx + dy * dy)) / 3.0 + 0.5, 0.0, 1.0)
    return mask


# ---------------------------------------------------------------------------------------------
# Fat


def _fat(rng: np.random.Generator, b: int, smooth: np.ndarray, lymph_density: np.ndarray) -> np.ndarray:
    """Fat in some patches: large empty cells with thin membranes (a Voronoi diagram), where the
    smooth half-resolution field is high. Returns the empty (white) share per canvas pixel."""
    has_fat = rng.random(b) < 0.3 * (1.1 - lymph_density)
    n_cells = 6
    seeds = rng.uniform(-30, CANVAS + 30, size=(b, n_cells, 2)).astype(np.float32)
    coverage = rng.uniform(0.3, 1.0, b)
    cover_level = np.array([NormalDist().inv_cdf(1 - c) for c in coverage], np.float32)
    empty = np.zeros((b, CANVAS, CANVAS), np.float32)
    idx = np.flatnonzero(has_fat)
    if idx.size == 0:
        return empty
    grid = np.arange(CANVAS, dtype=np.float32)
    # Distances to the nearest and second-nearest seed; membranes lie where the two are close.
    nearest = np.full((idx.size, CANVAS, CANVAS), np.inf, np.float32)
    second = nearest.copy()
    for k in range(n_cells):
        dy = grid[None, :, None] - seeds[idx, k, 0, None, None]
        dx = grid[None, None, :] - seeds[idx, k, 1, None, None]
        d = np.sqrt(dy * dy + dx * dx)
        second = np.minimum(second, np.maximum(nearest, d))
        nearest = np.minimum(nearest, d)
    inside_cell = np.clip((second - nearest) / 2.0 - 0.4, 0.0, 1.0)
    region = np.clip((_upsample2(smooth[idx]) - cover_level[idx, None, None]) / 0.3 + 0.5, 0.0, 1.0)
    empty[idx] = inside_cell * region
    return empty


# ---------------------------------------------------------------------------------------------
# Nuclei


@dataclass
class _Nuclei:
    """A flat list of nuclei over a chunk (canvas coordinates), ready to stamp."""

    patch: np.ndarray  # (N,) index of the patch in the chunk
    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray  # semi-axes, pixels
    b: np.ndarray
    angle: np.ndarray  # direction of the `a` axis: (x, y) = (cos, sin)
    harmonics: np.ndarray  # (N, 4) outline irregularity, as for clusters
    amount: np.ndarray  # hematoxylin per pixel


def _concat_nuclei(*parts: _Nuclei) -> _Nuclei:
    return _Nuclei(**{k: np.concatenate([vars(p)[k] for p in parts]) for k in vars(parts[0])})


def _at(field: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Per-patch values of a (B, C, C) field at positions (B, K), clamped to the canvas."""
    iy = np.clip(cy.astype(np.int64), 0, CANVAS - 1)
    ix = np.clip(cx.astype(np.int64), 0, CANVAS - 1)
    return field[np.arange(field.shape[0])[:, None], iy, ix]


def _keep(rng: np.random.Generator, prob: np.ndarray, **candidates: np.ndarray) -> _Nuclei:
    """Nuclei from (B, K[, 4]) candidate arrays, each kept with its probability."""
    keep = rng.random(prob.shape) < prob
    patch = np.broadcast_to(np.arange(keep.shape[0])[:, None], keep.shape)[keep]
    return _Nuclei(patch=patch, **{k: np.asarray(v, np.float32)[keep] for k, v in candidates.items()})


def _lattice(rng: np.random.Generator, pitch: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidate cell centres (B, rows * cols) on a jittered hexagonal lattice, randomly placed,
    with the given pitch per patch: cells packed in tissue are evenly spaced, not clumped."""
    b = len(pitch)
    row, col = np.divmod(np.arange(rows * cols, dtype=np.float32), cols)
    p = pitch[:, None]
    origin = -p * _uniform(rng, 0.5, 1.5, (b, 2))  # a little outside the canvas, so edges are covered
    cy = origin[:, :1] + row * p * np.float32(np.sqrt(0.75))
    cx = origin[:, 1:] + (col + 0.5 * (row % 2)) * p
    jitter = rng.standard_normal((2, b, rows * cols), dtype=np.float32) * (0.2 * p)
    return cy + jitter[0], cx + jitter[1]


def _lymphocytes(rng, lymph_local, tissue, in_cluster, slide) -> _Nuclei:
    """Small, dark, round nuclei, packed where the lymphocyte density field is high."""
    b = len(tissue)
    cy, cx = _lattice(rng, _uniform(rng, 6.0, 7.0, b), rows=22, cols=20)
    shape = cy.shape
    prob = _at(lymph_local, cy, cx) * _at(tissue, cy, cx) * (1.0 - _at(in_cluster, cy, cx))
    radius = _uniform(rng, 2.4, 3.2, shape)
    ratio = 1.0 - _uniform(rng, 0.0, 0.15, shape)
    return _keep(
        rng,
        prob,
        cy=cy,
        cx=cx,
        a=radius / np.sqrt(ratio),
        b=radius * np.sqrt(ratio),
        angle=_uniform(rng, 0, np.pi, shape),
        harmonics=np.zeros((*shape, 4)),
        amount=slide["h_strength"][:, None] * _uniform(rng, 1.0, 1.4, shape),
    )


def _stromal_nuclei(rng, fibre_angle, lymph_density, tissue, in_cluster, slide) -> _Nuclei:
    """Thin elongated nuclei lying along the collagen fibres."""
    shape = (len(tissue), 14)
    cy, cx = (_uniform(rng, PAD - 6, PAD + PATCH + 6, shape) for _ in range(2))
    prob = 0.6 * (1.0 - lymph_density[:, None]) * _at(tissue, cy, cx) * (1.0 - _at(in_cluster, cy, cx))
    return _keep(
        rng,
        prob,
        cy=cy,
        cx=cx,
        a=_uniform(rng, 3.5, 7.0, shape),
        b=_uniform(rng, 1.0, 1.8, shape),
        angle=fibre_angle[:, None] + rng.normal(0, 0.2, shape),
        harmonics=np.zeros((*shape, 4)),
        amount=slide["h_strength"][:, None] * _uniform(rng, 0.7, 1.0, shape),
    )


def _cluster_cells(rng, cl: _Clusters, in_cluster, slide) -> _Nuclei:
    """Cluster cells; severity s makes them larger, more varied, more irregular, darker, denser."""
    mean_radius = 3.4 + 3.2 * cl.severity
    # Cells sit side by side in a sheet; severe ones crowd until their nuclei nearly touch.
    cy, cx = _lattice(rng, 2 * mean_radius * (1.7 - 0.35 * cl.severity), rows=15, cols=13)
    shape = cy.shape
    prob = (_at(in_cluster, cy, cx) > 0.5) * cl.present[:, None]
    s, mean_radius = cl.severity[:, None], mean_radius[:, None]
    # Capped so that the largest nucleus still fits its stamping window (see _stamp_nuclei).
    radius = np.minimum(mean_radius * np.exp(rng.standard_normal(shape, dtype=np.float32) * (0.06 + 0.2 * s)), 9.0)
    ratio = 1.0 - rng.random(shape, dtype=np.float32) * (0.12 + 0.38 * s)
    irregularity = 0.03 + 0.14 * s
    harmonics = np.stack(
        [
            rng.random(shape, dtype=np.float32) * irregularity,
            _uniform(rng, 0, 2 * np.pi, shape),
            rng.random(shape, dtype=np.float32) * irregularity,
            _uniform(rng, 0, 2 * np.pi, shape),
        ],
        axis=-1,
    )
    return _keep(
        rng,
        prob,
        cy=cy,
        cx=cx,
        a=np.minimum(radius / np.sqrt(ratio), 11.0),
        b=radius * np.sqrt(ratio),
        angle=_uniform(rng, 0, np.pi, shape),
        harmonics=harmonics,
        amount=slide["h_strength"][:, None] * (0.45 + 0.55 * s) * np.exp(rng.normal(0, 0.12, shape)),
    )


STAMP_MARGIN = 32
"""Nuclei are stamped onto the canvas grown by this margin on each side, so no window needs clipping."""


def _stamp_nuclei(nuclei: _Nuclei, b: int) -> np.ndarray:
    """Draw nuclei into a (B, C, C) map of hematoxylin amount.

    Each nucleus is evaluated on a square window around its centre, with a soft edge about one
    pixel wide, and all windows are summed into the map with one bincount (overlaps add up).
    Nuclei are grouped by the window size they need, so small ones do not pay for large ones."""
    reach = np.maximum(nuclei.a, nuclei.b) * (1.0 + nuclei.harmonics[:, 0] + nuclei.harmonics[:, 2]) + 0.5
    half = np.ceil(reach).astype(np.int64)
    assert half.max(initial=0) <= STAMP_MARGIN // 2, "a nucleus is too large for the stamping margin"
    # Windows wholly off the canvas are dropped; the rest then lie within STAMP_MARGIN of it.
    visible = (nuclei.cy + half >= 0) & (nuclei.cy - half < CANVAS)
    visible &= (nuclei.cx + half >= 0) & (nuclei.cx - half < CANVAS)
    irregular = nuclei.harmonics.any(axis=1)
    key = half * 2 + irregular  # window size, and whether the outline needs its (costly) harmonics
    indices, weights = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for k in np.unique(key[visible]):
        group = visible & (key == k)
        index, weight = _stamp_windows(_Nuclei(**{f: v[group] for f, v in vars(nuclei).items()}), int(k // 2))
        indices.append(index)
        weights.append(weight)
    side = CANVAS + 2 * STAMP_MARGIN
    grown = np.bincount(np.concatenate(indices), np.concatenate(weights), minlength=b * side * side)
    grown = grown.reshape(b, side, side)
    return grown[:, STAMP_MARGIN:-STAMP_MARGIN, STAMP_MARGIN:-STAMP_MARGIN].astype(np.float32)


def _stamp_windows(nuclei: _Nuclei, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into the grown canvas, and hematoxylin weights, of one window per nucleus."""
    offsets = np.arange(-half, half + 1)
    iy0, ix0 = np.floor(nuclei.cy).astype(np.int64), np.floor(nuclei.cx).astype(np.int64)
    # Offsets of the window's rows (N, w, 1) and columns (N, 1, w) from the sub-pixel centre.
    dy = (iy0 - nuclei.cy)[:, None, None] + offsets.astype(np.float32)[None, :, None]
    dx = (ix0 - nuclei.cx)[:, None, None] + offsets.astype(np.float32)[None, None, :]
    cos, sin = np.cos(nuclei.angle)[:, None, None], np.sin(nuclei.angle)[:, None, None]
    a, b = nuclei.a[:, None, None], nuclei.b[:, None, None]
    # Edge softness: near the outline, outline^2 - q^2 ~ 2 (outline - q) with q the radius in
    # units of the nucleus size; times half the size in pixels, that is about a one-pixel ramp.
    soft = 0.5 * np.sqrt(a * b)
    if nuclei.harmonics.any():
        u = dx * (cos / a) + dy * (sin / a)  # along the `a` axis, in units of a
        v = dy * (cos / b) - dx * (sin / b)
        outline = _outline_scale(v, u, nuclei.harmonics[:, None, None, :])
        inside = (outline * outline - (u * u + v * v)) * soft
    else:
        # Plain ellipses: q^2 as a quadratic form of (dx, dy), with small factors precomputed.
        xx = (cos * cos / (a * a) + sin * sin / (b * b)) * soft
        yy = (sin * sin / (a * a) + cos * cos / (b * b)) * soft
        xy = 2 * cos * sin * (1 / (a * a) - 1 / (b * b)) * soft
        inside = soft - ((xx * dx * dx + yy * dy * dy) + (xy * dy) * dx)
    weight = np.clip(inside + 0.5, 0.0, 1.0) * nuclei.amount[:, None, None]

    side = CANVAS + 2 * STAMP_MARGIN
    rows = (nuclei.patch[:, None, None] * side + (iy0[:, None, None] + offsets[None, :, None] + STAMP_MARGIN)) * side
    index = rows + (ix0[:, None, None] + offsets[None, None, :] + STAMP_MARGIN)
    return index.ravel(), weight.ravel()
