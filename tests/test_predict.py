"""Prediction on new data: the same images as PNG files, a PCam h5 file or shards give the same
probabilities (and the same as `evaluate`); other sizes need --resize; bad input is named."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from histo_dist.evaluate import EvalConfig, evaluate
from histo_dist.files import PathError
from histo_dist.inference import DataMismatchError
from histo_dist.predict import InputError, PredictConfig, predict
from tests.eval_data import SHAPE, make_checkpoint, noisy_label, read_csv, trained_run
from tests.shard_data import encoded_image

N_TEST = 100


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    return trained_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The test split's images as a folder of PNGs and as a PCam-layout h5 pair."""
    root = tmp_path_factory.mktemp("predict-inputs")
    images = np.stack([encoded_image(j, SHAPE, learnable=True) for j in range(N_TEST)])
    (root / "png/sub").mkdir(parents=True)
    for j, image in enumerate(images):
        Image.fromarray(image).save(root / ("png/sub" if j % 3 == 0 else "png") / f"img_{j:03d}.png")
    (root / "h5").mkdir()
    with h5py.File(root / "h5/camelyonpatch_level_2_split_test_x.h5", "w") as f:
        f.create_dataset("x", data=images)
    with h5py.File(root / "h5/camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f.create_dataset("y", data=np.array([noisy_label(j) for j in range(N_TEST)], np.uint8).reshape(-1, 1, 1, 1))
    return {"png": root / "png", "h5": root / "h5/camelyonpatch_level_2_split_test_x.h5"}


def run_predict(checkpoint: Path, input: Path, output: Path, **kw) -> list[dict[str, str]]:
    predict(
        PredictConfig(
            checkpoint=str(checkpoint),
            input=str(input),
            output=str(output),
            batch_size=32,
            num_workers=0,
            progress=False,
            **kw,
        )
    )
    return read_csv(output)


def index_of(key: str) -> int:
    """Sample index from a PNG path (sub/img_007.png), an h5 row ("7") or a shard key (test_000000007)."""
    return int(Path(key).stem.rsplit("_", 1)[-1])


def by_index(rows: list[dict[str, str]], column: str = "probability") -> np.ndarray:
    out = np.full(N_TEST, np.nan)
    for r in rows:
        out[index_of(r["key"])] = float(r[column])
    return out


def test_png_folder_h5_and_shards_give_the_same_probabilities(run, inputs, tmp_path):
    shards, run_dir = run
    best = run_dir / "checkpoints/best.pt"
    png = run_predict(best, inputs["png"], tmp_path / "png.csv")
    h5 = run_predict(best, inputs["h5"], tmp_path / "h5.csv")
    shard = run_predict(best, shards, tmp_path / "shards.csv", split="test")
    assert len(png) == len(h5) == len(shard) == N_TEST
    assert {r["key"] for r in png} >= {"sub/img_000.png", "img_001.png"}  # relative paths, recursive
    assert set(png[0]) == {"key", "probability", "predicted", "predicted_name"}  # no labels for plain images
    assert set(h5[0]) == set(shard[0]) == {"key", "label", "probability", "predicted", "predicted_name"}
    reference = by_index(shard)
    np.testing.assert_allclose(by_index(png), reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_index(h5), reference, rtol=0, atol=1e-6)
    assert (
        by_index(h5, "label").tolist() == by_index(shard, "label").tolist() == [noisy_label(j) for j in range(N_TEST)]
    )
    assert all(r["predicted_name"] == ("positive" if float(r["probability"]) >= 0.5 else "negative") for r in png)
    # ... and the same as `evaluate` on the shards, with and without TTA.
    evaluate(
        EvalConfig(
            checkpoint=str(best),
            data=str(shards),
            output=str(tmp_path / "eval"),
            tta=True,
            bootstrap=0,
            plots=False,
            num_workers=0,
            progress=False,
        )
    )
    evaluated = read_csv(tmp_path / "eval/predictions.csv")
    np.testing.assert_allclose(by_index(evaluated), reference, rtol=0, atol=1e-6)
    tta = run_predict(best, inputs["png"], tmp_path / "png-tta.csv", tta=True)
    assert list(tta[0]) == [
        "key",
        "probability",
        "predicted",
        "predicted_name",
        "probability_tta",
        "predicted_tta",
        "predicted_name_tta",
    ]  # the schema of evaluate's predictions.csv
    np.testing.assert_allclose(by_index(tta), reference, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        by_index(tta, "probability_tta"), by_index(evaluated, "probability_tta"), rtol=0, atol=1e-6
    )


def test_threshold_from_an_evaluation_is_applied(run, inputs, tmp_path):
    shards, run_dir = run
    best = run_dir / "checkpoints/best.pt"
    results = evaluate(
        EvalConfig(
            checkpoint=str(best),
            data=str(shards),
            output=str(tmp_path / "eval"),
            threshold="f1",
            bootstrap=0,
            plots=False,
            num_workers=0,
            progress=False,
        )
    )
    rows = run_predict(best, inputs["h5"], tmp_path / "out.csv", threshold=str(tmp_path / "eval/metrics.json"))
    assert results["threshold"] != 0.5
    assert [int(r["predicted"]) for r in rows] == [int(float(r["probability"]) >= results["threshold"]) for r in rows]


def test_other_image_size_is_an_error_unless_resize(run, tmp_path):
    _, run_dir = run
    best = run_dir / "checkpoints/best.pt"
    folder = tmp_path / "big"
    folder.mkdir()
    for j in range(3):
        Image.fromarray(np.random.default_rng(j).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"{j}.png"
        )
    with pytest.raises(DataMismatchError, match=r"0.png: images are 40x40 pixels.*trained on 32x32.*--resize"):
        run_predict(best, folder, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()
    with h5py.File(tmp_path / "big_x.h5", "w") as f:
        f.create_dataset("x", data=np.zeros((4, 40, 40, 3), np.uint8))
    with pytest.raises(DataMismatchError, match=r"big_x.h5: images are 40x40"):
        run_predict(best, tmp_path / "big_x.h5", tmp_path / "out.csv")
    rows = run_predict(best, folder, tmp_path / "out.csv", resize=True)
    assert sorted(r["key"] for r in rows) == ["0.png", "1.png", "2.png"]
    assert len(run_predict(best, tmp_path / "big_x.h5", tmp_path / "h5.csv", resize=True)) == 4


def test_empty_folder_and_unknown_input_are_named(run, tmp_path):
    _, run_dir = run
    best = run_dir / "checkpoints/best.pt"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("no images here")
    with pytest.raises(InputError, match=r"empty: no image files .*\(1 other file\(s\)\)"):
        run_predict(best, tmp_path / "empty", tmp_path / "out.csv")
    with pytest.raises(PathError, match=r"--input .*missing: no such file or folder"):
        run_predict(best, tmp_path / "missing", tmp_path / "out.csv")


def test_checkpoint_for_another_number_of_classes_is_refused_on_labelled_data(run, tmp_path):
    shards, _ = run
    three = make_checkpoint(tmp_path / "three.pt", num_classes=3)
    with pytest.raises(DataMismatchError, match=r"trained for 3 classes"):
        run_predict(three, shards, tmp_path / "out.csv")


def test_missing_split_of_shards_is_named(run, tmp_path):
    shards, run_dir = run
    with pytest.raises(Exception, match=r"split 'unlabeled' not in this dataset; it has train, valid, test"):
        run_predict(run_dir / "checkpoints/best.pt", shards, tmp_path / "out.csv", split="unlabeled")


def test_cli_prints_the_error_and_exits_2(run, tmp_path, capsys):
    from histo_dist.cli import main

    _, run_dir = run
    (tmp_path / "empty").mkdir()
    code = main(
        [
            "predict",
            "--checkpoint",
            str(run_dir / "checkpoints/best.pt"),
            "--input",
            str(tmp_path / "empty"),
            "--output",
            str(tmp_path / "out.csv"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "histo-dist predict: error:" in capsys.readouterr().err


@pytest.mark.parametrize("keep", [True, False])
def test_predict_on_the_cpu_keeps_freed_memory_unless_told_not_to(inputs, tmp_path, monkeypatch, keep):
    import histo_dist.predict as predict_module

    calls = []
    monkeypatch.setattr(predict_module, "keep_freed_memory", lambda: calls.append("mallopt") or True)
    checkpoint = make_checkpoint(tmp_path / "best.pt")
    rows = run_predict(checkpoint, inputs["h5"], tmp_path / "p.csv", cpu=True, cpu_keep_freed_memory=keep)
    assert len(rows) == N_TEST and calls == (["mallopt"] if keep else [])
