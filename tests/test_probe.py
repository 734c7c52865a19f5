"""Heads on embeddings through `histo-dist train`: linear and MLP probes learn, N seeds give a mean and a spread,
a preempted probe resumes exactly, `histo-dist evaluate` scores them, and the wrong kind of data is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from histo_dist.errors import HistoDistError
from histo_dist.evaluate import EvalConfig, evaluate
from histo_dist.experiment import load_experiment
from histo_dist.train import Trainer, train
from tests.runs import ROOT, assert_same_weights, final_state, results_of
from tests.shard_data import make_embedding_dataset

SIZES = {"train": [300, 212], "valid": [128], "test": [128]}


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    return make_embedding_dataset(tmp_path_factory.mktemp("emb"), SIZES, dim=16).root


def probe_config(shards, *overrides: str):
    return load_experiment(
        ROOT / "configs/probe_eva.yaml",
        [f"data.shards={shards}", "train.max_steps=120", "loader.batch_size=32", "optim.lr=0.01", *overrides],
    )


def test_a_linear_probe_learns_on_each_seed_and_the_seeds_report_mean_and_spread(
    embeddings, tmp_path, keep_signal_handlers
):
    summary = train(probe_config(embeddings, "train.seeds=[0,1,2]"), tmp_path / "run")
    assert json.loads((tmp_path / "run/seeds.json").read_text()) == summary
    assert summary["seeds"] == [0, 1, 2] and summary["split"] == "test"
    balanced = summary["metrics"]["balanced_accuracy"]
    per_seed = [results_of(tmp_path / f"run/seed-{s}")["balanced_accuracy"] for s in (0, 1, 2)]
    assert balanced["values"] == per_seed
    assert balanced["mean"] == pytest.approx(sum(per_seed) / 3)
    mean = balanced["mean"]
    assert balanced["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in per_seed) / 2))
    assert min(per_seed) > 0.65  # chance is 0.5; the label moves one coordinate by 2 standard deviations
    weights = [final_state(tmp_path / f"run/seed-{s}")["model"]["net.fc.1.weight"] for s in (0, 1, 2)]
    assert not torch.equal(weights[0], weights[1])  # each seed its own initialisation and order
    assert "seeds" in (tmp_path / "run/config.yaml").read_text()


def test_an_mlp_probe_is_scored_by_evaluate_as_its_run_scored_it(embeddings, tmp_path, keep_signal_handlers):
    run = tmp_path / "run"
    train(probe_config(embeddings, "model.name=mlp_probe", "model.width=24", "train.seeds=[]"), run)
    assert final_state(run)["model"]["net.hidden.0.weight"].shape == (24, 16)
    out = tmp_path / "eval"
    results = evaluate(
        EvalConfig(checkpoint=str(run / "checkpoints/best.pt"), data=str(embeddings), output=str(out), threshold=0.5)
    )
    expected = results_of(run)
    assert {k: results[k] for k in ("accuracy", "auroc", "balanced_accuracy", "nll")} == {
        k: expected[k] for k in ("accuracy", "auroc", "balanced_accuracy", "nll")
    }
    assert (out / "predictions.csv").read_text().count("\n") == 1 + 128
    with pytest.raises(HistoDistError, match=r"--tta averages over the symmetries of images; this dataset holds"):
        evaluate(
            EvalConfig(checkpoint=str(run / "checkpoints/best.pt"), data=str(embeddings), output=str(out), tta=True)
        )


def test_a_preempted_probe_resumes_to_the_weights_of_an_uninterrupted_run(
    embeddings, tmp_path, monkeypatch, keep_signal_handlers
):
    from histo_dist.preemption import Preempted

    base = ["train.seeds=[]", "train.deterministic=true", "data.valid_split=valid", "train.max_steps=60"]
    train(probe_config(embeddings, *base), tmp_path / "full")
    real = Trainer.preempted
    monkeypatch.setattr(Trainer, "preempted", lambda self: self.step == 23 or real(self))
    with pytest.raises(Preempted):
        train(probe_config(embeddings, *base), tmp_path / "cut")
    assert final_state(tmp_path / "cut")["step"] == 23
    monkeypatch.setattr(Trainer, "preempted", real)
    train(probe_config(embeddings, *base), tmp_path / "cut")
    assert_same_weights(final_state(tmp_path / "full")["model"], final_state(tmp_path / "cut")["model"])
    assert results_of(tmp_path / "cut") == results_of(tmp_path / "full")


def test_images_and_embeddings_each_go_to_their_own_kind_of_model(embeddings, tmp_path):
    from histo_dist.models import ModelConfig, ModelError, build_model
    from tests.runs import make_train_shards

    with pytest.raises(ModelError, match=r"model.name=resnet18 takes images, and the data holds embeddings of 16"):
        Trainer(probe_config(embeddings, "model.name=resnet18"), tmp_path / "a")
    images = make_train_shards(tmp_path / "images")
    with pytest.raises(ModelError, match=r"linear_probe is a head on embeddings, and the data holds images of 32x32"):
        Trainer(probe_config(images), tmp_path / "b")
    with pytest.raises(HistoDistError, match=r"test.tta: TTA averages over the symmetries of images"):
        Trainer(probe_config(embeddings, "test.tta=true"), tmp_path / "c")
    with pytest.raises(HistoDistError, match=r"pretrained: linear_probe starts from random weights"):
        build_model(ModelConfig(name="linear_probe", pretrained="x.pth"), 2, (16,))
