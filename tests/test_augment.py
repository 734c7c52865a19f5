"""Per-sample augmentation: independence, determinism per seed, each op's semantics, config checks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from histo_dist.augment import (
    _RGB_FROM_HED,
    AugmentConfig,
    _stain_jitter,
    _uniforms,
    augment,
    draw_params,
    eval_transform,
)
from histo_dist.config import ConfigError, field_docs, from_dict

OFF = dict(
    dihedral=False,
    rotate_degrees=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    stain_sigma=0.0,
    stain_bias=0.0,
)
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output = image in [0, 1]
ALL_ON = AugmentConfig(rotate_degrees=15.0)
GEOMETRY_ON = dataclasses.replace(ALL_ON, crop=24, crop_jitter=3, resize=16)
SINGLE_OPS = {
    "dihedral": dict(dihedral=True),
    "rotate": dict(rotate_degrees=20.0),
    "brightness": dict(brightness=0.3),
    "contrast": dict(contrast=0.3),
    "saturation": dict(saturation=0.3),
    "hue": dict(hue=0.1),
    "stain": dict(stain_sigma=0.1, stain_bias=0.05),
}


def only(**ops) -> AugmentConfig:
    return AugmentConfig(**{**OFF, **RAW, **ops})


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Distinct, asymmetric, colourful uint8 patches."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def seeds(n: int, start: int = 1000) -> torch.Tensor:
    return torch.arange(start, start + n, dtype=torch.int64)


def distinct(batch: torch.Tensor) -> int:
    return len({row.numpy().tobytes() for row in batch})


# ---------------------------------------------------------------------------------------------
# Random numbers


def test_uniforms_follow_splitmix64_bit_for_bit():
    mask = (1 << 64) - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    values = [0, 1, -1, 7, 2**63 - 1, -(2**63), 123456789123]
    got = _uniforms(torch.tensor(values), 5)
    for i, seed in enumerate(values):
        for j in range(5):
            z = mix((mix(seed & mask) + (j + 1) * 0x9E3779B97F4A7C15) & mask)
            assert got[i, j].item() == (z >> 40) / 2**24, (seed, j)


def test_uniforms_look_uniform_and_unrelated_across_neighbouring_seeds():
    u = _uniforms(seeds(4096, start=0), 12)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    assert torch.histc(u, bins=10, min=0, max=1).min() > 0.09 * u.numel()
    corr = torch.corrcoef(torch.cat([u[:-1], u[1:]], 1).T)  # 12 streams, and each vs the next seed
    assert (corr - torch.eye(24)).abs().max() < 0.08


# ---------------------------------------------------------------------------------------------
# Per-sample independence and determinism


def test_copies_of_one_image_with_different_seeds_all_differ():
    batch = images(1).expand(64, -1, -1, -1)
    assert distinct(augment(batch, seeds(64), ALL_ON)) == 64


@pytest.mark.parametrize("op", SINGLE_OPS)
def test_each_op_alone_varies_across_samples(op):
    cfg = only(**SINGLE_OPS[op])
    out = augment(images(1).expand(64, -1, -1, -1), seeds(64), cfg)
    assert distinct(out) == (8 if op == "dihedral" else 64)
    p = draw_params(seeds(64), cfg)
    for name, value in p._asdict().items():  # the op's own parameters vary, the others stay put
        varies = value.float().std().item() > 0
        mine = {"rotate": "angle", "stain": "stain_"}.get(op, op) in name
        assert varies == mine, name


def test_same_seed_gives_the_same_output_whatever_the_batch():
    x, s = images(12), seeds(12)
    full = augment(x, s, ALL_ON)
    others, other_seeds = images(9, seed=1), seeds(9, start=-50)
    for i in range(12):
        assert torch.equal(augment(x[i : i + 1], s[i : i + 1], ALL_ON)[0], full[i])
        mixed = torch.cat([others[: i % 9], x[i : i + 1], others[i % 9 :]])
        mixed_seeds = torch.cat([other_seeds[: i % 9], s[i : i + 1], other_seeds[i % 9 :]])
        assert torch.equal(augment(mixed, mixed_seeds, ALL_ON)[i % 9], full[i])
    assert torch.equal(augment(x.flip(0), s.flip(0), ALL_ON), full.flip(0))


def test_different_seed_gives_a_different_output():
    x = images(8)
    assert not torch.equal(augment(x, seeds(8), ALL_ON), augment(x, seeds(8, start=5000), ALL_ON))


def test_output_i_comes_from_input_i():
    """Labels are attached by position: with colour ops only, each output is nearest its own input."""
    x = images(32, seed=3)
    out = augment(x, seeds(32), dataclasses.replace(AugmentConfig(**RAW), dihedral=False))
    dist = torch.cdist(out.flatten(1), x.float().flatten(1) / 255)
    assert torch.equal(dist.argmin(1), torch.arange(32))


# ---------------------------------------------------------------------------------------------
# Each op


def test_dihedral_is_one_of_the_eight_symmetries_uniformly():
    x = images(1, size=12)
    n = 4000
    out = augment(x.expand(n, -1, -1, -1), seeds(n), only(dihedral=True))
    variants = [torch.rot90(x[0].flip(-1) if k >= 4 else x[0], k % 4, dims=(-2, -1)) for k in range(8)]
    variants = torch.stack(variants).float() / 255
    assert distinct(variants) == 8
    matches = (out[:, None] == variants[None]).flatten(2).all(2)  # (n, 8)
    assert torch.equal(matches.sum(1), torch.ones(n, dtype=torch.long))
    k = matches.long().argmax(1)
    assert torch.equal(k, draw_params(seeds(n), only(dihedral=True)).dihedral)
    counts = torch.bincount(k, minlength=8)
    assert counts.min() > 420 and counts.max() < 580  # 500 expected, sd 21


def test_all_ops_off_is_exactly_the_image_over_255():
    x = images(4)
    assert torch.equal(augment(x, seeds(4), only()), x.float() / 255)


def test_parameters_of_different_ops_are_uncorrelated():
    p = draw_params(seeds(4000), GEOMETRY_ON)
    columns = torch.cat([v.float().view(4000, -1) for v in p], 1)  # 16 parameters
    corr = torch.corrcoef(columns.T)
    assert (corr - torch.eye(len(corr))).abs().max() < 0.08


def test_switching_one_op_off_leaves_the_others_parameters_alone():
    full = draw_params(seeds(32), ALL_ON)
    fewer = draw_params(seeds(32), dataclasses.replace(ALL_ON, brightness=0.0, dihedral=False, stain_sigma=0.0))
    assert torch.equal(fewer.brightness, torch.ones(32)) and not fewer.dihedral.any()
    assert torch.equal(fewer.stain_alpha, torch.ones(32, 3))
    for name in ("angle", "contrast", "saturation", "hue", "stain_beta"):
        assert torch.equal(getattr(full, name), getattr(fewer, name)), name


def test_disabled_is_eval_transform_and_that_matches_torchvision():
    x, cfg = images(4), dataclasses.replace(ALL_ON, enabled=False)
    assert torch.equal(augment(x, seeds(4), cfg), eval_transform(x, cfg))
    expected = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(cfg.mean), list(cfg.std))
    torch.testing.assert_close(eval_transform(x, cfg), expected)


def test_brightness_scales_each_sample_by_one_factor_in_range():
    x = images(1).expand(200, -1, -1, -1)
    out = augment(x, seeds(200), only(brightness=0.3))
    unclamped = (x[0] > 0) & (x[0] < 190)  # 190 * 1.3 < 255
    ratio = (out / (x.float() / 255))[:, unclamped]  # (200, pixels)
    per_sample = ratio.mean(1)
    torch.testing.assert_close(ratio, per_sample[:, None].expand_as(ratio))
    assert per_sample.min() >= 0.7 and per_sample.max() <= 1.3
    assert per_sample.min() < 0.75 and per_sample.max() > 1.25


@pytest.mark.parametrize(
    "op, reference",
    [
        ("brightness", TF.adjust_brightness),
        ("contrast", TF.adjust_contrast),
        ("saturation", TF.adjust_saturation),
        ("hue", TF.adjust_hue),
    ],
)
def test_colour_ops_match_torchvision_with_the_drawn_factor(op, reference):
    x, s, cfg = images(6), seeds(6), only(**SINGLE_OPS[op])
    x[:, 1, :4] = x[:, 0, :4]  # red and green tie for the max or min (hue formulas meet)
    x[:, :, 4:8] = x[:, :1, 4:8]  # grey: no hue at all
    out, factors = augment(x, s, cfg), getattr(draw_params(s, cfg), op)
    for i in range(6):
        expected = reference(x[i].float() / 255, factors[i].item())
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)


def test_rotation_matches_torchvision_inside_and_reflects_outside():
    x, s, cfg = images(4, size=40), seeds(4), only(rotate_degrees=30.0)
    out, angles = augment(x, s, cfg), draw_params(s, cfg).angle
    assert angles.abs().max() <= 30 and angles.std() > 5
    centred = torch.arange(40) - 19.5
    inside = centred[:, None] ** 2 + centred[None, :] ** 2 < 18**2  # source pixels inside the image
    for i in range(4):
        expected = TF.rotate(x[i].float() / 255, angles[i].item(), interpolation=TF.InterpolationMode.BILINEAR)
        torch.testing.assert_close(out[i][:, inside], expected[:, inside], atol=1e-5, rtol=0)
    flat = torch.full((4, 3, 40, 40), 200, dtype=torch.uint8)  # no black corners
    torch.testing.assert_close(augment(flat, s, cfg), torch.full((4, 3, 40, 40), 200 / 255))


def test_stain_jitter_without_jitter_round_trips():
    x = images(4).float() / 255
    out = _stain_jitter(x.clone(), torch.ones(4, 3), torch.zeros(4, 3))  # it works in place
    torch.testing.assert_close(out, x.clamp_min(1e-6), atol=2e-5, rtol=0)


def test_stain_jitter_matches_color_deconvolution_reference():
    """Tellez et al.: RGB -> OD -> HED concentrations, alpha * c + beta, back to RGB (numpy, float64)."""
    x, s, cfg = images(4), seeds(4), only(stain_sigma=0.2, stain_bias=0.05)
    out, p = augment(x, s, cfg).numpy(), draw_params(s, cfg)
    rgb_from_hed = _RGB_FROM_HED.numpy()
    for i in range(4):
        rgb = np.maximum(x[i].numpy().reshape(3, -1).T / 255.0, 1e-6)  # (pixels, 3)
        hed = -np.log10(rgb) @ np.linalg.inv(rgb_from_hed)
        hed = hed * p.stain_alpha[i].numpy() + p.stain_beta[i].numpy()
        expected = np.clip(10 ** -(hed @ rgb_from_hed), 0, 1).T.reshape(x[i].shape)
        np.testing.assert_allclose(out[i], expected, atol=1e-4)
    assert np.abs(out - x.numpy() / 255).mean() > 0.01  # visibly jittered


# ---------------------------------------------------------------------------------------------
# Crop and resize: training and evaluation see the same geometry


def test_evaluation_crop_is_the_centre_and_resize_is_antialiased_bilinear():
    x = images(4, size=32)
    out = eval_transform(x, only(crop=20))
    assert torch.equal(out, x[:, :, 6:26, 6:26].float() / 255)
    resized = eval_transform(x, only(crop=20, resize=12))
    exact = torch.nn.functional.interpolate(  # in float; the uint8 resize is within one level of it
        x[:, :, 6:26, 6:26].float() / 255, size=(12, 12), mode="bilinear", antialias=True, align_corners=False
    )
    torch.testing.assert_close(resized, exact, rtol=0, atol=1 / 255 + 1e-6)
    levels = resized * 255  # whole levels: resized on uint8, then normalised
    assert (levels - levels.round()).abs().max() < 1e-4 and (levels - exact * 255).abs().max() > 1e-3
    with pytest.raises(ValueError, match="crop 40 does not fit 32x32"):
        eval_transform(x, only(crop=40))


def test_training_crop_is_shifted_per_sample_within_the_jitter():
    x = images(1, size=32).expand(200, -1, -1, -1)
    out = augment(x, seeds(200), only(crop=20, crop_jitter=3))
    shifts = set()
    for i in range(200):  # each output is the image's 20x20 square at one shift from the centre (6, 6)
        found = [
            (dy, dx)
            for dy in range(-3, 4)
            for dx in range(-3, 4)
            if torch.equal(out[i], x[0, :, 6 + dy : 26 + dy, 6 + dx : 26 + dx].float() / 255)
        ]
        assert len(found) == 1, i
        shifts.add(found[0])
    assert len(shifts) == 49  # all 7 x 7 shifts occur


def test_same_seed_gives_the_same_crop_and_resize_whatever_the_batch():
    x, s = images(10), seeds(10)
    full = augment(x, s, GEOMETRY_ON)
    assert full.shape == (10, 3, 16, 16)
    for i in range(10):
        assert torch.equal(augment(x[i : i + 1], s[i : i + 1], GEOMETRY_ON)[0], full[i])
    assert torch.equal(augment(x.flip(0), s.flip(0), GEOMETRY_ON), full.flip(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for result in (augment(x_cl, s, GEOMETRY_ON), eval_transform(x_cl, GEOMETRY_ON)):
        assert result.shape == (10, 3, 16, 16) and result.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# Standardisation per image


def test_standardisation_gives_each_channel_of_each_image_mean_0_and_removes_its_staining_strength():
    x = images(6)
    cfg = dataclasses.replace(AugmentConfig(**OFF), standardise_per_image=True)
    out = eval_transform(x, cfg)
    plain = eval_transform(x, AugmentConfig(**OFF))
    centred = plain - plain.mean((2, 3), keepdim=True)
    sd = centred.pow(2).mean((2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(out, centred / (sd + 0.1), rtol=1e-5, atol=1e-5)
    # The same tissue stained fainter and darker per channel (an affine change of each channel): standardised, the
    # two are nearly the same image (uint8 rounding and the 0.1 aside); normalised only, they are far apart.
    faint = (x.float() * torch.tensor([0.6, 0.8, 0.7]).view(1, 3, 1, 1) + 40).round().to(torch.uint8)
    standardised_change = (eval_transform(faint, cfg) - out).abs().mean()
    normalised_change = (eval_transform(faint, AugmentConfig(**OFF)) - plain).abs().mean()
    assert standardised_change < 0.1 * normalised_change, (standardised_change, normalised_change)


def test_standardisation_is_the_same_in_training_and_evaluation_and_whatever_the_batch():
    x, s = images(8), seeds(8)
    cfg = dataclasses.replace(GEOMETRY_ON, standardise_per_image=True)
    full = augment(x, s, cfg)
    assert full.shape == (8, 3, 16, 16)
    assert not torch.equal(full, augment(x, s, GEOMETRY_ON))
    for i in range(8):
        assert torch.equal(augment(x[i : i + 1], s[i : i + 1], cfg)[0], full[i])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(augment(x_cl, s, cfg), full)
    assert augment(x_cl, s, cfg).is_contiguous(memory_format=torch.channels_last)
    geometry_only = dataclasses.replace(cfg, **OFF, crop_jitter=0)  # what training and evaluation share
    torch.testing.assert_close(augment(x, s, geometry_only), eval_transform(x, geometry_only), rtol=1e-5, atol=1e-5)
    assert torch.equal(eval_transform(x_cl, cfg), eval_transform(x, cfg))


# ---------------------------------------------------------------------------------------------
# Types, layouts, devices


def test_output_type_shape_and_channels_last():
    x = images(5)
    out = augment(x, seeds(5), ALL_ON)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.device == x.device
    assert out.is_contiguous()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for result in (augment(x_cl, seeds(5), ALL_ON), eval_transform(x_cl, ALL_ON)):
        assert result.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(augment(x_cl, seeds(5), ALL_ON), out)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="uint8"):
        augment(images(2).float(), seeds(2), ALL_ON)
    with pytest.raises(TypeError, match="seeds"):
        augment(images(2), seeds(3), ALL_ON)
    with pytest.raises(ValueError, match="square"):
        augment(images(2)[..., :20], seeds(2), ALL_ON)


@pytest.mark.gpu
def test_cuda_matches_cpu_and_is_batch_independent():
    x, s = images(16), seeds(16)
    on_gpu = augment(x.cuda(), s.cuda(), ALL_ON)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), augment(x, s, ALL_ON), atol=1e-4, rtol=0)
    assert torch.equal(augment(x[3:4].cuda(), s[3:4].cuda(), ALL_ON)[0], on_gpu[3])


# ---------------------------------------------------------------------------------------------
# Configuration


def test_defaults_are_valid_and_every_field_is_documented():
    assert AugmentConfig().validate() == []
    assert set(field_docs(AugmentConfig)) == {f.name for f in dataclasses.fields(AugmentConfig)}


@pytest.mark.parametrize(
    "field, value",
    [
        ("hue", 0.6),
        ("hue", -0.1),
        ("brightness", -0.2),
        ("contrast", math.inf),
        ("saturation", math.nan),
        ("rotate_degrees", 190.0),
        ("crop", -1),
        ("crop_jitter", -2),
        ("resize", -8),
        ("stain_sigma", 1.5),
        ("stain_bias", -0.01),
        ("std", (0.2, 0.0, 0.2)),
        ("mean", (0.5, 0.5)),
    ],
)
def test_bad_values_are_reported_by_field(field, value):
    problems = dataclasses.replace(AugmentConfig(), **{field: value}).validate()
    assert len(problems) == 1 and problems[0].startswith(f"{field}: ")


def test_config_loading_collects_every_problem():
    with pytest.raises(ConfigError) as err:
        from_dict(AugmentConfig, {"hue": 0.7, "std": [1, 1, -1], "where": "gpu"})
    assert len(err.value.problems) == 1 and "where" in err.value.problems[0]  # type errors come first
    with pytest.raises(ConfigError) as err:
        from_dict(AugmentConfig, {"hue": 0.7, "std": [1, 1, -1]})
    assert sorted(p.split(":")[0] for p in err.value.problems) == ["hue", "std"]
