"""`histo-dist embed`: every image of a split embedded once, in shards of the manifest contract that verify
checks; a checkpoint's embeddings are its head's input; a killed run resumes to the bytes of an uninterrupted
one; two ranks write the bytes one rank writes; and a tiny timm ViT trains, embeds and is probed end to end."""

from __future__ import annotations

import io
import signal
import time

import numpy as np
import pytest
import torch

from histo_dist.cli import main
from histo_dist.config import from_dict
from histo_dist.embed import PLAN_NAME, EmbedConfig
from histo_dist.embed import embed as embed_fn
from histo_dist.errors import HistoDistError
from histo_dist.manifest import Manifest
from histo_dist.shards import iter_raw_samples
from histo_dist.verify import verify_dataset
from tests.runs import ACCELERATE_LAUNCH, BIN, ROOT, make_train_shards, run, start
from tests.shard_data import make_dataset

VIT = ["model.name=timm/vit_tiny_patch16_224", "model.kwargs.img_size=32"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_train_shards(tmp_path_factory.mktemp("images"))


def embed(data, out, *args: str) -> int:
    return main(["embed", "--data", str(data), "--output", str(out), "--no-progress", *args])


def samples(folder, split):
    """(key, label, array) of a split's samples in shard order, read with the strict tar reader."""
    manifest = Manifest.load(folder)
    out = []
    for path in manifest.shard_paths(split):
        for s in iter_raw_samples(path):
            out.append((s.key, int(s.members["cls"]), np.load(io.BytesIO(s.members["npy"]))))
    return out


def shard_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_a_timm_vit_embeds_every_sample_once_in_shards_verify_checks(images, tmp_path):
    import timm

    from histo_dist.augment import AugmentConfig, eval_transform

    assert embed(images, tmp_path / "emb", *VIT) == 0
    manifest = Manifest.load(tmp_path / "emb")
    assert manifest.embeddings and manifest.image_shape == (192,) and manifest.dtype == "float16"
    assert manifest.source["backbone"] == "timm/vit_tiny_patch16_224" and manifest.source["input"]["resize"] == 32
    assert verify_dataset(tmp_path / "emb")[1] == []
    source = Manifest.load(images)
    torch.manual_seed(0)  # the seed a random backbone is built with (--seed, default 0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).eval()
    for split in source.splits:
        assert [s.name for s in manifest.split(split).shards] == [s.name for s in source.split(split).shards]
        got, expected = samples(tmp_path / "emb", split), samples(images, split)
        assert [(k, y) for k, y, _ in got] == [(k, y) for k, y, _ in expected]  # same keys, labels and order
        pixels = torch.from_numpy(np.stack([x for _, _, x in expected])).permute(0, 3, 1, 2)
        cfg = AugmentConfig(resize=32, mean=(0.5,) * 3, std=(0.5,) * 3)
        with torch.no_grad():
            direct = net(eval_transform(pixels, cfg))
        vectors = torch.from_numpy(np.stack([x for _, _, x in got]))
        assert vectors.dtype == torch.float16
        torch.testing.assert_close(vectors.float(), direct, atol=2e-3, rtol=2e-3)


def test_a_checkpoints_embeddings_are_the_input_of_its_classification_layer(images, tmp_path, keep_signal_handlers):
    from histo_dist.experiment import load_experiment
    from histo_dist.inference import load_inference_model
    from histo_dist.train import train

    cfg = load_experiment(
        ROOT / "configs/cpu_test.yaml",
        [
            f"data.shards={images}",
            "model.name=compact_cnn",
            "model.width=8",
            "train.max_steps=4",
            "schedule.warmup_steps=0",
            "data.test_split=",
        ],
    )
    train(cfg, tmp_path / "run")
    checkpoint = tmp_path / "run/checkpoints/best.pt"
    assert embed(images, tmp_path / "emb", "--checkpoint", str(checkpoint), "--splits", "valid") == 0
    assert list(Manifest.load(tmp_path / "emb").splits) == ["valid"]
    model = load_inference_model(checkpoint)
    captured = []
    model.model.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    expected = samples(images, "valid")
    pixels = torch.from_numpy(np.stack([x for _, _, x in expected])).permute(0, 3, 1, 2)
    model.probabilities(model.inputs(pixels))
    vectors = torch.from_numpy(np.stack([x for _, _, x in samples(tmp_path / "emb", "valid")]))
    assert vectors.shape == (88, 8 * 8)  # compact_cnn: 4 stages of width 8, 16, 32, 64
    torch.testing.assert_close(vectors.float(), captured[0], atol=2e-3, rtol=2e-3)


def test_mistakes_are_named_before_any_work(images, tmp_path, capsys):
    assert embed(images, tmp_path / "a") == 2
    assert "no backbone: give --checkpoint" in capsys.readouterr().err
    assert embed(images, tmp_path / "a", "--checkpoint", "x.pt", "model.name=resnet18") == 2
    assert "brings its own model and input; drop the model values" in capsys.readouterr().err
    assert embed(images, tmp_path / "emb", "model.name=compact_cnn", "model.width=4", "--splits", "test") == 0
    assert embed(tmp_path / "emb", tmp_path / "b", "model.name=compact_cnn") == 2
    assert "holds embeddings already" in capsys.readouterr().err
    assert embed(images, tmp_path / "emb", "model.name=compact_cnn", "model.width=4", "--splits", "test") == 2
    assert "already holds a finished conversion" in capsys.readouterr().err
    before = shard_bytes(tmp_path / "emb")
    assert embed(images, tmp_path / "emb", "model.name=compact_cnn", "model.width=8", "--overwrite") == 0
    assert Manifest.load(tmp_path / "emb").image_shape == (64,) and shard_bytes(tmp_path / "emb") != before


@pytest.mark.slow
def test_a_killed_embedding_keeps_its_shards_and_resumes_to_the_uninterrupted_bytes(tmp_path):
    data = tmp_path / "images"
    make_dataset(data, {"train": [6] * 8}, shape=(32, 32, 3), learnable=True)
    args = ["-m", "histo_dist", "embed", "--data", str(data), "--no-progress", "--batch-size", "2"]
    backbone = ["model.name=timm/resnet18"]  # 224 px: slow enough on a CPU to be killed between shards
    whole = run([str(BIN / "python"), *args, "--output", str(tmp_path / "whole"), *backbone], timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cut"
    proc = start([str(BIN / "python"), *args, "--output", str(out), *backbone])
    deadline = time.monotonic() + 300
    while not list(out.glob("train-*.tar")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert 0 < len(kept) < 8 and not (out / "manifest.json").exists() and (out / PLAN_NAME).exists()
    again = run([str(BIN / "python"), *args, "--output", str(out), *backbone], timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all((out / name).stat().st_ino == inode for name, inode in kept.items())  # kept, not rewritten
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert (out / "manifest.json").read_text() == (tmp_path / "whole/manifest.json").read_text()
    assert not (out / PLAN_NAME).exists()


@pytest.mark.slow
def test_two_ranks_write_the_bytes_one_rank_writes(images, tmp_path):
    args = ["-m", "histo_dist", "embed", "--data", str(images), "--no-progress", "model.name=compact_cnn"]
    one = run([str(BIN / "python"), *args, "--output", str(tmp_path / "one")], timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run([*ACCELERATE_LAUNCH, "--num_processes", "2", *args, "--output", str(tmp_path / "two")], timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert shard_bytes(tmp_path / "two") == shard_bytes(tmp_path / "one")
    assert Manifest.load(tmp_path / "two").splits == Manifest.load(tmp_path / "one").splits


@pytest.mark.slow
def test_a_tiny_timm_vit_trains_embeds_and_is_probed_end_to_end(images, tmp_path, keep_signal_handlers):
    from histo_dist.evaluate import EvalConfig, evaluate
    from histo_dist.experiment import load_experiment
    from histo_dist.train import train

    cfg = load_experiment(
        ROOT / "configs/cpu_test.yaml", [f"data.shards={images}", *VIT, "train.max_steps=6", "schedule.warmup_steps=0"]
    )
    assert (cfg.augment.resize, cfg.augment.mean) == (32, (0.5, 0.5, 0.5))  # the ViT's own input
    train(cfg, tmp_path / "vit")
    checkpoint = str(tmp_path / "vit/checkpoints/best.pt")
    assert embed(images, tmp_path / "emb", "--checkpoint", checkpoint) == 0
    probe = load_experiment(
        ROOT / "configs/probe_eva.yaml",
        [f"data.shards={tmp_path / 'emb'}", "train.max_steps=40", "loader.batch_size=32", "train.seeds=[0,1]"],
    )
    summary = train(probe, tmp_path / "probe")
    assert len(summary["metrics"]["auroc"]["values"]) == 2
    results = evaluate(
        EvalConfig(
            checkpoint=str(tmp_path / "probe/seed-1/checkpoints/best.pt"),
            data=str(tmp_path / "emb"),
            output=str(tmp_path / "eval"),
        )
    )
    assert results["num_samples"] == 64 and 0 <= results["auroc"] <= 1
    # A randomly initialised timm ResNet's features of the same images, probed: the pipeline for CNNs too.
    assert embed(images, tmp_path / "emb-resnet", "model.name=timm/resnet18", "augment.resize=32") == 0
    assert Manifest.load(tmp_path / "emb-resnet").image_shape == (512,)
    probe = load_experiment(
        ROOT / "configs/probe_eva.yaml",
        [f"data.shards={tmp_path / 'emb-resnet'}", "train.max_steps=40", "loader.batch_size=32", "train.seeds=[]"],
    )
    assert train(probe, tmp_path / "probe-resnet")["num_samples"] == 64


def test_a_backbone_whose_features_overflow_float16_is_refused_naming_the_sample(images, tmp_path, monkeypatch):
    from histo_dist.models import SimpleCNN

    real = SimpleCNN.forward
    monkeypatch.setattr(SimpleCNN, "forward", lambda self, x: real(self, x) * 1e6)
    cfg = from_dict(
        EmbedConfig, {"data": str(images), "output": str(tmp_path / "e"), "splits": "test", "progress": False}
    )
    with pytest.raises(HistoDistError, match=r"the embedding of test_\d+ .* beyond float16's range"):
        embed_fn(cfg)


@pytest.mark.parametrize("keep", [True, False])
def test_embed_on_the_cpu_keeps_freed_memory_unless_told_not_to(images, tmp_path, monkeypatch, keep):
    import histo_dist.embed as embed_module

    calls = []
    monkeypatch.setattr(embed_module, "keep_freed_memory", lambda: calls.append("mallopt") or True)
    options = {"data": str(images), "output": str(tmp_path / "e"), "splits": "test", "progress": False}
    embed_fn(from_dict(EmbedConfig, {**options, "cpu": True, "cpu_keep_freed_memory": keep}))
    assert Manifest.load(tmp_path / "e").embeddings and calls == (["mallopt"] if keep else [])
