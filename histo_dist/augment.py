"""Per-sample augmentation of uint8 RGB patches, batched, on whatever device the batch is on.

`augment(images, seeds, cfg)` takes a uint8 batch (N, 3, H, W) and one int64 seed per sample and
returns the float32 batch, augmented and normalised. The same code runs in the loader workers (CPU,
`cfg.where == "worker"`) or on the training device (`"device"`).

Two properties the loader relies on:

- *Every sample draws its own parameters.* torchvision's v2 transforms draw one parameter set per
  call, so on a batched tensor every sample would get the same flip and the same jitter
  (pytorch/vision#8484). Here every op takes per-sample parameter tensors and is written with
  plain torch ops that broadcast them.
- *A sample's output depends only on its image and its seed*, not on the rest of the batch or its
  position in it, so a run can be replayed whatever the batch size or the number of workers. The
  random numbers come from a counter-based hash of (seed, parameter index), computed in int64 torch
  ops, with no torch.Generator; the ops are elementwise (a sum over an image is an explicit tree of
  elementwise adds, since torch's reductions pick their summation order from the batch's shape).

Pipeline, each step skipped when its strength is 0: crop around the centre, shifted per sample
(on uint8) -> resize (on uint8) -> dihedral symmetry (on uint8) -> small-angle rotation -> H&E stain jitter ->
brightness -> contrast -> saturation -> hue -> normalisation -> standardisation per image (off by
default). The colour steps follow torchvision's ColorJitter semantics but always run in this fixed
order. Evaluation (`eval_transform`) takes the same centre crop and resize, then normalises (and
standardises, where training does): the model sees the same geometry in both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AugmentConfig:
    enabled: bool = True
    """Master switch; when false only normalisation runs."""
    where: Literal["worker", "device"] = "worker"
    """Run augmentation in the loader workers (CPU) or batched on the training device."""
    dihedral: bool = True
    """One of the 8 symmetries of the square (flips, 90-degree rotations), uniformly: tissue has no orientation."""
    rotate_degrees: float = 0.0
    """Extra rotation by an angle uniform in [-d, d] degrees, reflection-padded (no black corners); 0 is off.
    Off by default: the symmetries already cover orientation, and resampling blurs and costs the most."""
    brightness: float = 0.2
    """Multiply by a factor uniform in [max(0, 1 - b), 1 + b] (ColorJitter brightness); 0 is off."""
    contrast: float = 0.2
    """Blend with the mean grey by a factor uniform in [max(0, 1 - c), 1 + c] (ColorJitter contrast); 0 is off."""
    saturation: float = 0.2
    """Blend with the greyscale image by a factor uniform in [max(0, 1 - s), 1 + s] (ColorJitter saturation)."""
    hue: float = 0.04
    """Shift the hue by a fraction of the colour circle uniform in [-h, h], h <= 0.5 (ColorJitter hue); 0 is off."""
    stain_sigma: float = 0.05
    """H&E stain jitter (Tellez et al. 2018): scale each stain concentration of the Ruifrok-Johnston colour
    deconvolution (haematoxylin, eosin, DAB) by a factor uniform in [1 - sigma, 1 + sigma]; 0 is off."""
    stain_bias: float = 0.02
    """H&E stain jitter: shift each stain concentration by an amount uniform in [-bias, bias], in optical
    density units (-log10 of the transmitted light); 0 is off."""
    crop: int = 0
    """Side of the square cut out of the centre of every patch, in training and evaluation alike (PCam's label is
    decided by the centre 32x32 pixels); 0 keeps the whole patch. Training shifts it by crop_jitter."""
    crop_jitter: int = 0
    """Training only: shift the crop by a whole number of pixels uniform in [-j, j], per sample and direction."""
    resize: int = 0
    """Resize (after cropping) to this side, bilinear with antialiasing, in training and evaluation alike; 0 keeps
    the size. Fewer pixels, more images per second."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    """Per-channel mean subtracted from the [0, 1] image (ImageNet's, to match pretrained backbones)."""
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    """Per-channel standard deviation the image is divided by after subtracting the mean."""
    standardise_per_image: bool = False
    """After the normalisation, give each channel of each image its own mean 0 and standard deviation about 1:
    (x - image mean) / (image std + 0.1), in the normalised units (the 0.1 keeps flat patches from being blown
    up). It takes away how dark and how saturated an image's staining is, which varies between slides, labs and
    scanners; the shapes and the colour within the image stay. Training and evaluation alike."""

    def validate(self) -> list[str]:
        problems = []

        def check(name: str, lo: float, hi: float, what: str) -> None:
            value = getattr(self, name)
            if not (math.isfinite(value) and lo <= value <= hi):
                problems.append(f"{name}: must be {what}, got {value}")

        check("rotate_degrees", 0, 180, "in [0, 180]")
        for name in ("brightness", "contrast", "saturation", "stain_bias"):
            check(name, 0, math.inf, "finite and >= 0")
        check("hue", 0, 0.5, "in [0, 0.5]")
        check("stain_sigma", 0, 1, "in [0, 1] (a stain scale factor cannot go negative)")
        for name in ("crop", "crop_jitter", "resize"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.crop_jitter > 0 and not self.crop:
            problems.append("crop_jitter: shifts the crop; set crop (the crop's side) too")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                problems.append(f"{name}: must have 3 values (R, G, B), got {getattr(self, name)}")
        if not all(math.isfinite(m) for m in self.mean):
            problems.append(f"mean: must be finite, got {self.mean}")
        if not all(0 < s < math.inf for s in self.std):
            problems.append(f"std: every value must be > 0 and finite, got {self.std}")
        return problems


# ---------------------------------------------------------------------------------------------
# Per-sample random numbers: splitmix64 over (seed, counter), in int64 torch ops

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's state increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(c: int) -> int:
    """The int64 with the bits of the 64-bit unsigned constant `c` (torch has no uint64 arithmetic)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 words: `>>` copies the sign bit in, the mask clears it."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser: a bijection of 64-bit words where every input bit flips about half
    the output bits. Multiplications wrap around in int64, which is what the uint64 original does."""
    z = (z ^ _shr(z, 30)) * _int64(_MIX1)
    z = (z ^ _shr(z, 27)) * _int64(_MIX2)
    return z ^ _shr(z, 31)


def _uniforms(seeds: Tensor, count: int) -> Tensor:
    """(N, count) float32 uniform in [0, 1): entry (i, j) depends only on seeds[i] and j.

    Entry j is output j+1 of a splitmix64 generator whose state starts at mix(seed); mixing the seed
    first keeps seeds that are close together (the loader's are) from sharing streams."""
    counters = torch.arange(1, count + 1, device=seeds.device)
    z = _mix64(_mix64(seeds).unsqueeze(1) + counters * _int64(_GOLDEN))
    return _shr(z, 40).float() * 2.0**-24  # the top 24 bits: exactly representable in float32


# ---------------------------------------------------------------------------------------------
# Parameters


class AugmentParams(NamedTuple):
    """What each sample drew; ops that are off get their identity value."""

    dihedral: Tensor  # (N,) int64 in [0, 8): the symmetry of `dihedral_views`
    angle: Tensor  # (N,) degrees, counter-clockwise
    brightness: Tensor  # (N,) factor
    contrast: Tensor  # (N,) factor
    saturation: Tensor  # (N,) factor
    hue: Tensor  # (N,) shift in turns of the colour circle
    stain_alpha: Tensor  # (N, 3) scale of the haematoxylin, eosin, DAB concentrations
    stain_beta: Tensor  # (N, 3) shift of the same, optical density (log10) units
    crop_shift: Tensor  # (N, 2) int64 shift of the crop (rows, columns) from the centre, pixels


def draw_params(seeds: Tensor, cfg: AugmentConfig) -> AugmentParams:
    """The parameters each sample of `augment` uses, derived from its seed alone.

    Every parameter has its own fixed hash counter, so switching one op off or changing its
    strength leaves what the other ops draw unchanged."""
    u = _uniforms(seeds, 14).unbind(1)

    def between(lo: float, hi: float, v: Tensor) -> Tensor:
        return lo + (hi - lo) * v

    def factor(strength: float, v: Tensor) -> Tensor:
        return between(max(0.0, 1 - strength), 1 + strength, v)

    dihedral = (u[0] * 8).long() if cfg.dihedral else torch.zeros_like(seeds)  # exact: u is k / 2**24
    return AugmentParams(
        dihedral=dihedral,
        angle=between(-cfg.rotate_degrees, cfg.rotate_degrees, u[1]),
        brightness=factor(cfg.brightness, u[2]),
        contrast=factor(cfg.contrast, u[3]),
        saturation=factor(cfg.saturation, u[4]),
        hue=between(-cfg.hue, cfg.hue, u[5]),
        stain_alpha=factor(cfg.stain_sigma, torch.stack(u[6:9], 1)),
        stain_beta=between(-cfg.stain_bias, cfg.stain_bias, torch.stack(u[9:12], 1)),
        crop_shift=(torch.stack(u[12:14], 1) * (2 * cfg.crop_jitter + 1)).long() - cfg.crop_jitter,  # exact
    )


# ---------------------------------------------------------------------------------------------
# Ops on batches (N, 3, H, W); per-sample parameters are (N,) tensors


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def dihedral_views(x: Tensor) -> Iterator[Tensor]:
    """The 8 symmetries of the square applied to (..., H, W), the identity first: symmetry k mirrors
    left-right when k >= 4, then rotates by k % 4 quarter turns. Augmentation draws k per sample;
    test-time augmentation averages over all 8 in this order."""
    for k in range(8):
        yield torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, dims=(-2, -1))


@functools.lru_cache(maxsize=8)
def _dihedral_indices(size: int, device: torch.device) -> Tensor:
    """(8, size*size): for symmetry k, the flat source pixel of each flat output pixel."""
    base = torch.arange(size * size, device=device).view(size, size)
    return torch.stack(list(dihedral_views(base))).flatten(1)


def _dihedral(images: Tensor, k: Tensor) -> Tensor:
    """Sample i gets symmetry k[i]: one gather over all samples instead of grouping them by k."""
    n, c, h, w = images.shape
    if h != w:
        raise ValueError(f"dihedral symmetries need square images, got {h}x{w}")
    index = _dihedral_indices(h, images.device)[k]  # (N, H*W)
    return images.flatten(2).gather(2, index.unsqueeze(1).expand(n, c, h * w)).view(n, c, h, w)


def _crop(images: Tensor, size: int, shift: Tensor | None = None) -> Tensor:
    """The size x size square at the centre of each image, moved by shift[i] = (rows, columns) pixels for
    sample i (clamped inside the image): two gathers, one per axis, instead of a loop over samples."""
    n, c, h, w = images.shape
    if size > min(h, w):
        raise ValueError(f"crop {size} does not fit {h}x{w} images")
    top, left = (h - size) // 2, (w - size) // 2
    if shift is None or not shift.any():
        return images[:, :, top : top + size, left : left + size]
    steps = torch.arange(size, device=images.device)
    rows = (top + shift[:, 0]).clamp(0, h - size)[:, None] + steps  # (N, size)
    cols = (left + shift[:, 1]).clamp(0, w - size)[:, None] + steps
    x = images.gather(2, rows[:, None, :, None].expand(n, c, size, w))
    return x.gather(3, cols[:, None, None, :].expand(n, c, size, size))


def _resize(images: Tensor, size: int) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear with antialiasing (each sample on its own),
    to the nearest level. On the CPU this is torch's uint8 kernel: at 96 -> 48 px about 9x its float kernel,
    which cost more than the rest of the augmentation together. Elsewhere float, rounded: the two differ by at
    most one level in a sixth of the pixels."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    if images.device.type == "cpu":
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate counter-clockwise (as torchvision's rotate) about the centre, bilinear, reflecting at
    the border. The sampling grid is built elementwise: F.affine_grid uses a batched matmul, whose
    kernel may vary with the batch size."""
    h, w = x.shape[-2:]
    # sin/cos in float64 so that the scalar and SIMD code paths (which can differ by an ulp) round to
    # the same float32; 2N transcendentals, nothing next to the image.
    rad = torch.deg2rad(degrees.double())
    cos, sin = rad.cos().float().view(-1, 1, 1), rad.sin().float().view(-1, 1, 1)
    xs = (torch.arange(w, device=x.device) * 2 + 1) / w - 1  # pixel centres, align_corners=False
    ys = ((torch.arange(h, device=x.device) * 2 + 1) / h - 1).unsqueeze(1)
    # For each output pixel, the input point to sample, in [-1, 1] coordinates (y down); the
    # aspect ratio factors make it a true rotation on non-square images.
    gx = cos * xs - (sin * (h / w)) * ys
    gy = cos * ys + (sin * (w / h)) * xs
    grid = torch.stack((gx, gy), dim=-1)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# Ruifrok & Johnston (2001): the optical density (OD) of each stain in R, G, B, one row per stain
# (haematoxylin, eosin, DAB), as in scikit-image's rgb2hed.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
# Jittering concentrations (hed' = alpha * hed + beta) is linear in OD space:
#   od' = sum_s alpha_s * STAIN_BASIS[s] @ od + beta @ RGB_FROM_HED,
# with STAIN_BASIS[s][d, c] = HED_FROM_RGB[c, s] * RGB_FROM_HED[s, d]. So a sample's whole jitter is
# one 3x3 matrix and an offset, and the image never goes through HED space itself.
_STAIN_BASIS = torch.einsum("cs,sd->sdc", _HED_FROM_RGB, _RGB_FROM_HED).float()
_EPS = 1e-6  # floor on transmitted light, so black pixels have a finite OD (as in scikit-image)


@functools.lru_cache(maxsize=8)
def _stain_matrices(device: torch.device) -> tuple[Tensor, Tensor]:
    """STAIN_BASIS and RGB_FROM_HED on `device`, copied once: a copy from host memory per call
    would, on CUDA, also wait for the GPU to finish everything queued before it."""
    return _STAIN_BASIS.to(device), _RGB_FROM_HED.float().to(device)


def _stain_jitter(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """H&E-DAB jitter (Tellez et al. 2018); alpha, beta (N, 3). Overwrites x. A log and an exp per
    value plus 3 multiply-adds; sums of 3 terms are spelled out rather than matmuls, whose kernels
    may change with the batch size."""
    basis, rgb_from_hed = _stain_matrices(x.device)
    mixing = sum(alpha[:, s, None, None] * basis[s] for s in range(3))  # (N, 3, 3)
    offset = sum(beta[:, s, None] * rgb_from_hed[s] for s in range(3)) * math.log(10)  # (N, 3), natural-log OD
    log_light = x.clamp_min_(_EPS).log_()  # -OD: the signs cancel in the linear map, so no negations
    out = mixing[:, :, 0, None, None] * log_light[:, 0:1]
    for c in (1, 2):
        out += mixing[:, :, c, None, None] * log_light[:, c : c + 1]
    out -= offset[:, :, None, None]
    return out.exp_().clamp_(max=1.0)


def _grayscale(x: Tensor) -> Tensor:
    """(N, 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(1)
    gray = r * 0.2989
    gray += g * 0.587
    gray += b * 0.114
    return gray.unsqueeze(1)


def _mean_per_image(x: Tensor) -> Tensor:
    """(N, 1, 1, 1) mean over each sample, summed as a fixed pairwise tree of elementwise adds: a
    torch reduction picks its summation order from the tensor's shape (on GPU from how many
    outputs there are), so the mean of sample i could change in the last bit with the batch size.
    Costs about two passes over the image (zero padding to a power of two, then the halvings)."""
    flat = x.flatten(1)
    size = flat.shape[1]
    flat = F.pad(flat, (0, (1 << (size - 1).bit_length()) - size))
    while flat.shape[1] > 1:
        half = flat.shape[1] // 2
        flat = flat[:, :half] + flat[:, half:]
    return _per_sample(flat / size)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """torchvision's blend: factor * x + (1 - factor) * other, clamped to [0, 1]. Overwrites x."""
    f = _per_sample(factor)
    return x.mul_(f).add_((1 - f) * other).clamp_(0, 1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue by `shift` turns, keeping saturation and value (torchvision's adjust_hue).

    S and V are never materialised: with hue h in [0, 6) (sixths of a turn), channel R, G, B is
    max - (max - min) * clamp(||h - c| - 3| - 1, 0, 1) for c = 3, 5, 1 respectively."""
    r, g, b = x.unbind(1)
    top, bottom = x.amax(1), x.amin(1)  # (N, H, W) planes from here to `ramp`: a third of a pass each
    chroma = top - bottom
    # Hue from whichever channel is the max; where two tie, their formulas agree. 0/1 masks pick
    # the formula by arithmetic, as torch.where is several times slower on CPU.
    r_max = top == r
    g_max = (top == g) & ~r_max
    b_max = ~(r_max | g_max)
    sector = (g - b) * r_max
    sector += (b - r + 2 * chroma) * g_max
    sector += (r - g + 4 * chroma) * b_max
    sector /= chroma.clamp_min(1e-12)  # grey pixels: 0 / tiny, any hue does as chroma 0 keeps them grey
    sector += 6 * shift.view(-1, 1, 1)
    sector.remainder_(6)
    ramp = torch.stack([sector - c for c in (3.0, 5.0, 1.0)], dim=1)
    ramp.abs_().sub_(3).abs_().sub_(1).clamp_(0, 1)
    return ramp.mul_(-chroma.unsqueeze(1)).add_(top.unsqueeze(1))


# ---------------------------------------------------------------------------------------------
# Entry points


def _check(images: Tensor, seeds: Tensor | None = None) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise TypeError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if seeds is not None and (seeds.dtype != torch.int64 or seeds.shape != images.shape[:1]):
        raise TypeError(f"seeds must be int64 ({images.shape[0]},), got {seeds.dtype} {tuple(seeds.shape)}")


def _memory_format(images: Tensor) -> torch.memory_format:
    """Give channels-last input back as channels-last (what a channels-last model wants)."""
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _normalize_(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel, in place. Python scalars rather than (1, 3, 1, 1) tensors:
    those would be copied from the host per call, which on CUDA waits for the GPU's queue."""
    for channel, m, s in zip(x.unbind(1), mean, std):
        channel.sub_(m).div_(s)
    return x


def _standardise_per_image(x: Tensor) -> Tensor:
    """(x - mean) / (std + 0.1) over each channel of each image, as a new contiguous tensor; the means are fixed
    summation trees (`_mean_per_image`), so a sample's result does not depend on its batch."""
    n, c, h, w = x.shape
    planes = x.reshape(n * c, 1, h, w)
    planes = planes - _mean_per_image(planes)
    return planes.div_(_mean_per_image(planes * planes).sqrt_().add_(0.1)).view(n, c, h, w)


def eval_transform(images: Tensor, cfg: AugmentConfig) -> Tensor:
    """The evaluation input: uint8 (N, 3, H, W) -> the centre crop (cfg.crop), resized (cfg.resize), as float32
    (x / 255 - mean) / std, no randomness; the crop and resize are done on uint8, as in training. It is computed
    as (x - 255 mean) / (255 std), two passes, which is exactly x / 255 for mean 0, std 1. Channels-last input
    stays channels-last."""
    _check(images)
    fmt = _memory_format(images)
    x = _crop(images, cfg.crop) if cfg.crop else images
    x = _resize(x, cfg.resize) if cfg.resize else x
    x = _normalize_(x.float(), tuple(255 * m for m in cfg.mean), tuple(255 * s for s in cfg.std))
    if cfg.standardise_per_image:
        x = _standardise_per_image(x)
    return x.contiguous(memory_format=fmt)


def augment(images: Tensor, seeds: Tensor, cfg: AugmentConfig) -> Tensor:
    """Augment and normalise a uint8 batch (N, 3, H, W) on its own device; sample i uses seeds[i].

    Returns float32 (N, 3, H, W), channels-last if the input was. Seeds already on the images'
    device save a copy. `cfg` is taken as valid (config loading runs `AugmentConfig.validate`)."""
    _check(images, seeds)
    if not cfg.enabled:
        return eval_transform(images, cfg)
    p = draw_params(seeds.to(images.device), cfg)
    x = _crop(images, cfg.crop, p.crop_shift if cfg.crop_jitter else None) if cfg.crop else images
    x = _resize(x, cfg.resize) if cfg.resize else x  # as evaluation does, on uint8
    x = _dihedral(x, p.dihedral) if cfg.dihedral else x  # on uint8: a quarter of the bytes
    x = x.float().div_(255)  # a fresh tensor, so the steps below work in place
    if cfg.rotate_degrees > 0:
        x = _rotate(x, p.angle)
    if cfg.stain_sigma > 0 or cfg.stain_bias > 0:
        x = _stain_jitter(x, p.stain_alpha, p.stain_beta)
    if cfg.brightness > 0:
        x = x.mul_(_per_sample(p.brightness)).clamp_(0, 1)
    if cfg.contrast > 0:
        x = _blend(x, _mean_per_image(_grayscale(x)), p.contrast)
    if cfg.saturation > 0:
        x = _blend(x, _grayscale(x), p.saturation)
    if cfg.hue > 0:
        x = _shift_hue(x, p.hue)
    x = _normalize_(x, cfg.mean, cfg.std)
    if cfg.standardise_per_image:
        x = _standardise_per_image(x)
    return x.contiguous(memory_format=_memory_format(images))
