"""`histo-dist synth`: the synthetic PCam set (file layout, determinism, labels, learnability, CLI)."""

from __future__ import annotations

import argparse
import csv
import hashlib
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from histo_dist import cli, synth
from histo_dist.config import ConfigError
from histo_dist.errors import HistoDistError

META_HEADER = ["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"]


def write(out: Path, **overrides) -> dict:
    settings = {"n_train": 70, "n_valid": 5, "n_test": 0, "seed": 1, "workers": 1, **overrides}
    cfg = synth.SynthConfig(output=str(out), **settings)
    return synth.write_synthetic_pcam(cfg)


def read_split(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    paths = synth.pcam_paths(out, split)
    with h5py.File(paths["x"], "r") as fx, h5py.File(paths["y"], "r") as fy:
        x, y = fx["x"][:], fy["y"][:]
    with open(paths["meta"], newline="") as f:
        rows = list(csv.reader(f))
    return x, y, rows


def pcam_file_names() -> set[str]:
    return {f"camelyonpatch_level_2_split_{s}_{p}" for s in synth.SPLITS for p in ("x.h5", "y.h5", "meta.csv")}


# ---------------------------------------------------------------------------------------------
# Layout


def test_writes_the_exact_pcam_layout(tmp_path):
    result = write(tmp_path)  # 70 crosses a render-chunk boundary; an empty split is allowed
    assert {p.name for p in tmp_path.iterdir()} == pcam_file_names()  # and no temporary files left
    for split, n in result["counts"].items():
        paths = synth.pcam_paths(tmp_path, split)
        with h5py.File(paths["x"], "r") as fx, h5py.File(paths["y"], "r") as fy:
            assert list(fx) == ["x"] and list(fy) == ["y"]
            assert fx["x"].dtype == np.uint8 and fx["x"].shape == (n, 96, 96, 3)
            assert fy["y"].dtype == np.uint8 and fy["y"].shape == (n, 1, 1, 1)
        x, y, rows = read_split(tmp_path, split)
        labels = y.reshape(-1)
        assert set(labels.tolist()) <= {0, 1}
        assert rows[0] == META_HEADER
        body = rows[1:]
        assert len(body) == n
        assert [r[0] for r in body] == [str(i) for i in range(n)]
        for row, label in zip(body, labels):
            coord_y, coord_x, tumor_patch, centre_tumor, wsi = row[1:]
            assert int(coord_y) >= 0 and int(coord_x) >= 0
            assert tumor_patch in ("True", "False") and centre_tumor == str(bool(label))
            assert tumor_patch == "True" or centre_tumor == "False"  # tumor in the centre is tumor in the patch
            assert wsi.startswith(f"synth_{split}_")
        assert result["tumor"][split] == int(labels.sum())
    assert result["total"] == 75 and result["images_per_s"] > 0


@pytest.mark.realdata
def test_layout_and_colours_match_the_real_pcam_files(tmp_path, real_data):
    write(tmp_path, n_test=3)
    for split in synth.SPLITS:
        for part, name in (("x", "x"), ("y", "y")):
            with (
                h5py.File(real_data / f"camelyonpatch_level_2_split_{split}_{part}.h5", "r") as real,
                h5py.File(synth.pcam_paths(tmp_path, split)[part], "r") as ours,
            ):
                assert list(ours) == list(real) == [name]
                assert ours[name].dtype == real[name].dtype
                assert ours[name].shape[1:] == real[name].shape[1:]
                assert (ours[name].chunks, ours[name].compression) == (real[name].chunks, real[name].compression)

    # The official meta CSV columns, as documented next to the real data.
    source = (real_data / "SOURCE.md").read_text() if (real_data / "SOURCE.md").exists() else ""
    documented = re.search(r"with columns ([\w, ]+)", source)
    if documented:
        assert [c.strip() for c in documented.group(1).split(",")] == META_HEADER[1:]

    # H&E colours: per-channel means near the real ones, green (absorbed by both stains) lowest.
    with h5py.File(real_data / "camelyonpatch_level_2_split_valid_x.h5", "r") as f:
        real_mean = f["x"][:400].reshape(-1, 3).mean(axis=0)
    x, _, _ = synth.make_patches(512, np.random.default_rng(0))  # 8 synthetic slides
    synth_mean = x.reshape(-1, 3).mean(axis=0)
    assert np.abs(synth_mean - real_mean).max() < 30, (synth_mean, real_mean)
    assert synth_mean.argmin() == real_mean.argmin() == 1


# ---------------------------------------------------------------------------------------------
# Determinism, splits, labels


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    write(tmp_path / "a", seed=5)
    write(tmp_path / "b", seed=5, workers=3)  # the thread count must not change the output
    write(tmp_path / "c", seed=6)
    for split in ("train", "valid"):
        xa, ya, meta_a = read_split(tmp_path / "a", split)
        xb, yb, meta_b = read_split(tmp_path / "b", split)
        xc, _, _ = read_split(tmp_path / "c", split)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb) and meta_a == meta_b
        assert not np.array_equal(xa, xc)


def test_make_patches_is_deterministic_per_generator_state():
    x1, y1, m1 = synth.make_patches(40, np.random.default_rng(3))
    x2, y2, m2 = synth.make_patches(40, np.random.default_rng(3))
    x3, _, _ = synth.make_patches(40, np.random.default_rng(4))
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert all(np.array_equal(m1[c], m2[c]) for c in synth.META_COLUMNS)
    assert not np.array_equal(x1, x3)
    assert len({hashlib.sha1(img.tobytes()).digest() for img in x1}) == len(x1)  # no repeated patch


def test_splits_do_not_share_images(tmp_path):
    write(tmp_path, n_train=64, n_valid=64, n_test=64)
    hashes = {}
    for split in synth.SPLITS:
        x, _, _ = read_split(tmp_path, split)
        hashes[split] = {hashlib.sha1(img.tobytes()).digest() for img in x}
        assert len(hashes[split]) == 64
    assert not hashes["train"] & hashes["valid"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["valid"] & hashes["test"]


@pytest.mark.parametrize("n, fraction", [(101, 0.5), (200, 0.5), (50, 0.3)])
def test_class_balance_is_exact(n, fraction):
    _, y, meta = synth.make_patches(n, np.random.default_rng(n), tumor_fraction=fraction)
    assert y.dtype == np.uint8 and y.shape == (n,)
    assert int(y.sum()) == round(n * fraction)
    assert np.array_equal(meta["center_tumor_patch"], y.astype(bool))


def test_some_negatives_hold_tumor_outside_the_centre():
    """As in real PCam, tumor anywhere in the patch is not the label: only the centre counts."""
    _, y, meta = synth.make_patches(200, np.random.default_rng(0))
    assert np.all(meta["tumor_patch"][y == 1])
    off_centre = meta["tumor_patch"][y == 0].mean()
    assert 0.1 < off_centre < 0.45  # about P_OFF_CENTRE_TUMOR


def test_tumor_reaches_the_centre_exactly_for_positives():
    """The labels hold by construction: a positive's tumor outline overlaps the centre 32x32
    region, an off-centre tumor's outline stays clear of it and still shows in the patch."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 100_000).astype(np.uint8)
    clusters, tumor = synth._draw_clusters(rng, labels)
    lo, hi = synth.PAD + synth.CENTRE[0], synth.PAD + synth.CENTRE[1] - 1

    def distance_to_box(first: float, last: float) -> np.ndarray:
        dy = np.maximum(np.maximum(first - clusters.cy, clusters.cy - last), 0)
        dx = np.maximum(np.maximum(first - clusters.cx, clusters.cx - last), 0)
        return np.hypot(dy, dx)

    outline_min, outline_max = 0.7 * clusters.radius, 1.3 * clusters.radius
    positive, off_centre = labels == 1, tumor & (labels == 0)
    assert off_centre.sum() > 100
    assert np.all(distance_to_box(lo, hi)[positive] < outline_min[positive])
    assert np.all(distance_to_box(lo, hi)[off_centre] > outline_max[off_centre])
    patch_last = synth.PAD + synth.PATCH - 1
    assert np.all(distance_to_box(synth.PAD, patch_last)[off_centre] < outline_min[off_centre])
    # The outline's bounds hold: harmonics up to 0.24 and fraying up to 4% stay within [0.7, 1.3].
    harmonic_sum = clusters.harmonics[:, 0] + clusters.harmonics[:, 2]
    assert (1 - harmonic_sum.max()) * 0.96 >= 0.7 and (1 + harmonic_sum.max()) * 1.04 <= 1.3


@pytest.mark.slow
def test_a_small_cnn_learns_the_labels_but_not_perfectly():
    """Learnable (well above chance) yet not trivial (below 100%): about 0.83-0.91 measured."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from torch import nn

    train_stream, valid_stream = np.random.SeedSequence(7).spawn(2)
    x_train, y_train, _ = synth.make_patches(1536, np.random.default_rng(train_stream))
    x_valid, y_valid, _ = synth.make_patches(512, np.random.default_rng(valid_stream))

    def tensors(x: np.ndarray) -> torch.Tensor:
        # 4x average pooling (24x24 inputs) keeps this test fast; nuclei are still a few pixels wide.
        images = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).sub(0.6).div(0.25)
        return F.avg_pool2d(images, 4)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: more threads only contend
    try:
        torch.manual_seed(0)
        x_t, y_t = tensors(x_train), torch.from_numpy(y_train).long()
        x_v, y_v = tensors(x_valid), torch.from_numpy(y_valid).long()

        def block(cin: int, cout: int) -> list:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

        model = nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 32), nn.Flatten(), nn.Linear(32 * 3 * 3, 2))
        epochs, batch = 6, 64
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * -(-len(x_t) // batch))
        for _ in range(epochs):
            model.train()
            for idx in torch.randperm(len(x_t)).split(batch):
                loss = F.cross_entropy(model(x_t[idx]), y_t[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_v).argmax(1) == y_v).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    print(f"synthetic PCam: small CNN validation accuracy {accuracy:.3f}")
    assert 0.70 <= accuracy <= 0.97


# ---------------------------------------------------------------------------------------------
# Overwriting and atomic writes


def test_refuses_to_overwrite_unless_asked(tmp_path):
    write(tmp_path, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(HistoDistError, match=r"camelyonpatch_level_2_split_train_x\.h5.*--overwrite"):
        write(tmp_path, seed=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    write(tmp_path, seed=2, overwrite=True)
    assert {p.name for p in tmp_path.iterdir()} == pcam_file_names()
    train_x = "camelyonpatch_level_2_split_train_x.h5"
    assert (tmp_path / train_x).read_bytes() != before[train_x]


def test_refuses_when_any_single_file_exists(tmp_path):
    (tmp_path / "camelyonpatch_level_2_split_test_meta.csv").write_text("mine\n")
    with pytest.raises(HistoDistError, match="split_test_meta.csv"):
        write(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["camelyonpatch_level_2_split_test_meta.csv"]


def test_output_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(HistoDistError, match="a file, expected a folder"):
        write(tmp_path / "file")


def test_an_interrupted_run_leaves_no_partial_files(tmp_path, monkeypatch):
    write(tmp_path, seed=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    render = synth._render
    calls = []

    def render_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the second chunk of train: x.h5 is half written by now
            raise KeyboardInterrupt
        return render(*args, **kwargs)

    monkeypatch.setattr(synth, "_render", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, seed=2, overwrite=True)
    # The old files are intact, and no temporary file is left behind.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# Configuration and command line


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    synth.configure(parser)
    return parser.parse_args(argv)


def test_run_writes_files_and_reports_speed(tmp_path, capsys):
    args = parse(["--output", str(tmp_path / "out"), "--n-train", "6", "--n-valid", "4", "--n-test", "2"])
    assert synth.run(args) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == pcam_file_names()
    out = capsys.readouterr().out
    assert "train: 6 patches (3 tumor)" in out and "images/s" in out
    x, _, _ = read_split(tmp_path / "out", "train")
    assert x.shape == (6, 96, 96, 3)


def test_bad_values_are_listed_together(tmp_path):
    args = parse(["--output", str(tmp_path), "--n-train", "-1", "--n-test", "-3", "--tumor-fraction", "1.5"])
    with pytest.raises(ConfigError) as info:
        synth.run(args)
    assert info.value.problems == [
        "n_train: must be >= 0, got -1",
        "n_test: must be >= 0, got -3",
        "tumor_fraction: must be in [0, 1], got 1.5",
    ]
    assert not any(tmp_path.iterdir())


def test_output_is_required():
    with pytest.raises(SystemExit):
        parse(["--n-train", "4"])


def test_through_the_histo_dist_command(tmp_path, capsys):
    argv = ["synth", "--output", str(tmp_path), "--n-train", "4", "--n-valid", "2", "--n-test", "2"]
    assert cli.main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} == pcam_file_names()
    assert cli.main(argv) == 2  # a second run refuses to overwrite ...
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0  # ... unless asked
    assert cli.main(["synth", "--output", str(tmp_path), "--n-valid", "-2", "--overwrite"]) == 2
    assert "n_valid: must be >= 0, got -2" in capsys.readouterr().err
