"""Model registry: output shapes, stages and freezing, frozen batch norms, pretrained weights without network."""

from __future__ import annotations

import socket

import pytest
import torch
import torchvision
from torch import nn

from histo_dist.config import ConfigError, from_dict
from histo_dist.errors import HistoDistError
from histo_dist.models import (
    ARCHITECTURES,
    MODEL_NAMES,
    ModelConfig,
    ModelError,
    architecture,
    build_model,
    hub_weights_path,
    num_outputs,
    stage_parameters,
    whiten_stem_,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt, by torch hub or a raw socket, fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub"), "torch.hub.set_dir was called elsewhere"
    return tmp_path / "torch" / "hub"


def backbone_state(model) -> dict[str, torch.Tensor]:
    head = model.head_path + "."
    return {k: v.clone() for k, v in model.net.state_dict().items() if not k.startswith(head)}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# Shapes and stages


def test_num_outputs():
    assert num_outputs(2) == 1
    assert num_outputs(9) == 9
    with pytest.raises(ModelError, match="at least 2 classes"):
        num_outputs(1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_gives_its_logits_and_stages_split_its_backbone(name):
    shape = (48,) if ARCHITECTURES[name].inputs == "embeddings" else (96, 96, 3)
    x = torch.randn(2, 48) if len(shape) == 1 else torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert build_model(ModelConfig(name=name, dropout=0.2), 2, shape)(x).shape == (2, 1)
        model = build_model(ModelConfig(name=name), 5, shape)
        assert model(x).shape == (2, 5)
    assert_stages_split_the_backbone(model, ModelConfig(name=name))


def assert_stages_split_the_backbone(model, cfg: ModelConfig) -> None:
    """Every backbone parameter is in exactly one stage, so freezing the last stage freezes the whole backbone."""
    owners: dict[int, list[str]] = {}
    for stage, paths in architecture(cfg.name).stages_of(cfg).items():
        for path in paths:
            for p in stage_parameters(model.net, path):
                owners.setdefault(id(p), []).append(stage)
    assert all(len(stages) == 1 for stages in owners.values()), owners
    assert set(owners) == {id(p) for p in model.backbone_parameters()}
    assert not set(owners) & {id(p) for p in model.head_parameters()}


# ---------------------------------------------------------------------------------------------
# Freezing


def test_freeze_all_trains_only_the_head():
    model = build_model(ModelConfig(name="resnet18", freeze="all"), 2)
    assert [id(p) for p in model.parameters() if p.requires_grad] == [id(p) for p in model.head_parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = nn.functional.binary_cross_entropy_with_logits(model(torch.randn(4, 3, 96, 96)), torch.ones(4, 1))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Only the head moved: no backbone weight, and no batch-norm running statistic either.
    assert changed == {"net.fc.1.weight", "net.fc.1.bias"}


def test_freeze_to_a_stage_freezes_the_stem_up_to_it():
    model = build_model(ModelConfig(name="resnet18", freeze="layer2"), 2)
    frozen_modules = ("conv1.", "bn1.", "layer1.", "layer2.")
    for name, p in model.net.named_parameters():
        assert p.requires_grad != name.startswith(frozen_modules), name


def test_frozen_batch_norms_stay_in_eval_mode():
    model = build_model(ModelConfig(name="resnet18", freeze="layer2"), 2)
    model.eval()
    model.train()
    assert not model.net.bn1.training and not model.net.layer2[1].bn2.training
    assert model.net.layer3[0].bn1.training and model.net.fc.training
    running_mean = model.net.layer1[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 96, 96))
    assert torch.equal(model.net.layer1[0].bn1.running_mean, running_mean)
    # Still so after DDP's SyncBatchNorm conversion replaces the modules.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).train()
    assert isinstance(model.net.bn1, nn.SyncBatchNorm) and not model.net.bn1.training
    assert model.net.layer3[0].bn1.training
    model.eval()
    assert not model.net.layer3[0].bn1.training


# ---------------------------------------------------------------------------------------------
# Pretrained weights


def test_imagenet_weights_missing_from_the_hub_cache_name_the_file_and_url(hub_dir):
    with pytest.raises(HistoDistError) as error:
        build_model(ModelConfig(name="resnet18", pretrained="imagenet"), 2)
    message = str(error.value)
    assert str(hub_dir / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert not (hub_dir / "checkpoints").exists()


def test_imagenet_weights_load_from_the_hub_cache(hub_dir):
    imagenet = torchvision.models.resnet18()  # stands in for the real file: same keys, 1000-class fc
    with torch.no_grad():
        imagenet.bn1.running_mean.uniform_()
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    path = hub_weights_path(weights)
    assert path == hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), path)
    for pretrained in ("imagenet", "IMAGENET1K_V1", "DEFAULT"):
        model = build_model(ModelConfig(name="resnet18", pretrained=pretrained), 5)
        expected = {k: v for k, v in imagenet.state_dict().items() if not k.startswith("fc.")}
        assert_same(backbone_state(model), expected)
        assert model.net.fc[1].weight.shape == (5, 512)


def test_old_densenet_key_names_are_renamed(hub_dir):
    densenet = torchvision.models.densenet121()
    # torchvision's published DenseNet files spell denselayerN.norm1 as denselayerN.norm.1
    old = {k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in densenet.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = hub_weights_path(torchvision.models.DenseNet121_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    torch.save(old, path)
    model = build_model(ModelConfig(name="densenet121", pretrained="imagenet"), 2)
    assert_same(
        backbone_state(model), {k: v for k, v in densenet.state_dict().items() if not k.startswith("classifier.")}
    )


def test_weights_file_from_another_instance_reproduces_its_backbone(tmp_path):
    source = build_model(ModelConfig(name="resnet18"), 2)
    with torch.no_grad():
        source.net.layer4[1].bn2.running_var.uniform_(1, 2)
    torch.save(source.state_dict(), tmp_path / "run.pt")  # Classifier keys: net.conv1.weight, ...
    model = build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "run.pt"), freeze="layer3"), 5)
    assert_same(backbone_state(model), backbone_state(source))
    assert model.net.fc[1].weight.shape == (5, 512)


def test_weights_file_formats(tmp_path):
    """Checkpoint dicts, DDP / compile key prefixes and safetensors files hold the same weights."""
    source = build_model(ModelConfig(name="simple_cnn"), 2)
    torch.save(
        {"model": {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, "step": 3}, tmp_path / "ckpt.pt"
    )
    files = [tmp_path / "ckpt.pt"]
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(source.net.state_dict(), str(tmp_path / "net.safetensors"))
    files.append(tmp_path / "net.safetensors")
    for path in files:
        model = build_model(ModelConfig(name="simple_cnn", pretrained=str(path)), 3)
        assert_same(backbone_state(model), backbone_state(source))


def test_weights_file_of_another_architecture_is_refused_clearly(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(
        ModelError, match=r"resnet34\.pth does not fit the resnet18 backbone: unexpected .*layer1\.2\.conv1\.weight"
    ):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "resnet34.pth")), 2)
    torch.save(build_model(ModelConfig(), 2).state_dict(), tmp_path / "cnn.pth")
    with pytest.raises(
        ModelError, match=r"cnn\.pth does not fit the resnet18 backbone: missing \(\d+\): conv1\.weight"
    ):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "cnn.pth")), 2)
    with pytest.raises(
        ModelError, match=r"shape mismatch.*features\.0\.0\.weight \(file \(16, 3, 3, 3\), model \(32, 3, 3, 3\)\)"
    ):
        state = build_model(ModelConfig(), 2).net.state_dict()
        state["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
        torch.save(state, tmp_path / "narrow.pth")
        build_model(ModelConfig(pretrained=str(tmp_path / "narrow.pth")), 2)


def test_unreadable_or_missing_weights_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read weights file .*junk.pth"):
        build_model(ModelConfig(pretrained=str(tmp_path / "junk.pth")), 2)
    with pytest.raises(ModelError, match="nope.pth.*no such file"):
        build_model(ModelConfig(pretrained=str(tmp_path / "nope.pth")), 2)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_config_problems_name_their_field():
    assert ModelConfig().validate() == []
    assert ModelConfig(name="resnet50", pretrained="IMAGENET1K_V2", freeze="layer3").validate() == []
    (problem,) = ModelConfig(name="resnt18").validate()
    assert problem.startswith(
        "name: unknown model 'resnt18' (did you mean 'resnet18'?); known: simple_cnn, compact_cnn"
    )
    (problem,) = ModelConfig(name="compact_resnet", freeze="stage5").validate()
    assert (
        problem
        == "freeze: compact_resnet has no stage 'stage5'; valid: none, all, stem, stage1, stage2, stage3, stage4"
    )
    (problem,) = ModelConfig(name="compact_cnn", depths=(2, 0, 1)).validate()
    assert problem.startswith("depths: 1 to 8 stages")
    (problem,) = ModelConfig(name="resnet18", freeze="layer5").validate()
    assert problem == "freeze: resnet18 has no stage 'layer5'; valid: none, all, stem, layer1, layer2, layer3, layer4"
    (problem,) = ModelConfig(name="resnet18", pretrained="IMAGENET1K_V2").validate()
    assert problem.startswith(
        "pretrained: resnet18 has no weights 'IMAGENET1K_V2'; known: imagenet, IMAGENET1K_V1, DEFAULT"
    )
    (problem,) = ModelConfig(pretrained="imagenet").validate()
    assert problem.startswith("pretrained: simple_cnn has no torchvision weights")
    (problem,) = ModelConfig(dropout=1.0).validate()
    assert problem.startswith("dropout:")
    with pytest.raises(ConfigError) as error:
        from_dict(ModelConfig, {"name": "vgg16_bn", "freeze": "layer2", "dropout": -0.1})
    assert [p.split(":")[0] for p in error.value.problems] == ["dropout", "freeze"]
    with pytest.raises(ConfigError, match="freeze: convnext_tiny has no stage"):
        build_model(ModelConfig(name="convnext_tiny", freeze="layer1"), 2)


@pytest.mark.parametrize("name", ["compact_cnn", "compact_resnet"])
def test_compact_models_take_any_patch_size_and_scale_with_width_and_depth(name):
    small = build_model(ModelConfig(name=name, width=8, depths=(1, 1)), 2)
    large = build_model(ModelConfig(name=name, width=16, depths=(2, 2, 2)), 2)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(large) > 4 * count(small)
    with torch.no_grad():
        for size in (32, 48, 64, 96):
            assert large.eval()(torch.randn(3, 3, size, size)).shape == (3, 1)
    frozen = build_model(ModelConfig(name=name, width=8, depths=(1, 1), freeze="stage1"), 2)
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("net.stages.1", "net.fc")) for n in trainable), trainable


@pytest.mark.parametrize("name", ["compact_cnn", "compact_resnet"])
def test_a_strided_stem_runs_the_stages_on_a_larger_input_at_the_smaller_ones_resolution(name):
    """model.stem_stride=2 on 64 px: every stage sees the feature maps that stride 1 sees on 32 px (the recipe's
    cost), with the same parameters; the stem's filters see every pixel of the larger input."""
    plain = build_model(ModelConfig(name=name, width=8, depths=(1, 1)), 2).eval()
    strided = build_model(ModelConfig(name=name, width=8, depths=(1, 1), stem_stride=2), 2).eval()
    assert strided.net.stem[0].stride == (2, 2) and plain.net.stem[0].stride == (1, 1)
    assert [p.shape for p in strided.parameters()] == [p.shape for p in plain.parameters()]
    with torch.no_grad():
        for side in (64, 96):
            assert (
                strided.net.stem(torch.randn(2, 3, side, side)).shape
                == plain.net.stem(torch.randn(2, 3, side // 2, side // 2)).shape
            )
            assert strided(torch.randn(2, 3, side, side)).shape == (2, 1)
        images = torch.randn(1, 3, 64, 64)
        shifted = images.clone()
        shifted[..., 1::2, 1::2] += 1.0  # pixels a stride-2 sampling without overlap would miss
        assert not torch.equal(strided.net.stem(images), strided.net.stem(shifted))
    assert (
        build_model(ModelConfig(name="compact_cnn", width=8, stem_stride=3), 2)
        .net.stem(torch.randn(1, 3, 96, 96))
        .shape[-1]
        == 32
    )


def test_stem_stride_is_checked():
    assert ModelConfig(name="compact_cnn", stem_stride=3).validate() == []
    for stride in (0, 4):
        (problem,) = ModelConfig(name="compact_cnn", stem_stride=stride).validate()
        assert problem == f"stem_stride: must be in [1, 3], got {stride}"
    (problem,) = ModelConfig(name="resnet18", stem_stride=2).validate()
    assert problem == "stem_stride: is for compact_cnn and compact_resnet, not resnet18; leave it at 1"


# ---------------------------------------------------------------------------------------------
# model.stem_init=whiten


def correlated_images(n: int = 32, size: int = 32) -> torch.Tensor:
    """Smooth, colour-correlated noise: neighbouring pixels and the three channels move together, as in tissue."""
    g = torch.Generator().manual_seed(0)
    base = nn.functional.avg_pool2d(torch.randn(n, 1, size + 2, size + 2, generator=g), 3, stride=1)
    return base * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1) + 0.1 * torch.randn(n, 3, size, size, generator=g)


def stem_output_covariance(model, images: torch.Tensor) -> torch.Tensor:
    out = model.net.stem[0](images).detach().transpose(0, 1).flatten(1)  # (channels, pixels), before the BN
    return torch.cov(out.double())


def test_whitened_stem_outputs_start_decorrelated_in_pairs_of_opposite_filters():
    images = correlated_images()
    model = build_model(ModelConfig(name="compact_cnn", width=16, depths=(1, 1), stem_init="whiten"), 2)
    before = stem_output_covariance(model, images)
    whiten_stem_(model, images)
    weight = model.net.stem[0].weight
    assert torch.equal(weight[:8], -weight[8:])
    cov = stem_output_covariance(model, images)[:8, :8]
    off_diagonal = cov - torch.diag(cov.diag())
    assert off_diagonal.abs().max() < 0.05  # decorrelated, up to the zero padding at the border
    assert (cov.diag() > 0.5).all() and (cov.diag() < 1.1).all()  # unit variance, less eps's share
    random = before[:8, :8] / before[:8, :8].diag().sqrt().outer(before[:8, :8].diag().sqrt())
    assert (random - torch.eye(8)).abs().max() > 0.5  # the default init's outputs are strongly correlated
    again = build_model(ModelConfig(name="compact_resnet", width=80, depths=(1,), stem_init="whiten"), 2)
    init = again.net.stem[0].weight.clone()
    whiten_stem_(again, images)
    assert torch.equal(again.net.stem[0].weight[54:], init[54:])  # 27 directions x 2; the rest keep their init


def test_stem_init_is_checked():
    assert ModelConfig(name="compact_resnet", stem_init="whiten").validate() == []
    (problem,) = ModelConfig(name="resnet18", stem_init="whiten").validate()
    assert problem == "stem_init: whiten is for compact_cnn and compact_resnet, not resnet18"
    (problem,) = ModelConfig(name="compact_cnn", stem_init="whiten", init_from="best.pt").validate()
    assert problem.startswith("stem_init: whiten starts the stem from the data")
    assert problem.endswith("give model.stem_init=default with them")
    from histo_dist.train import new_run  # the new-run hint of a refused resume gives that too

    hint = new_run("run/best.pt", "whiten")
    assert hint == "--run-dir NEW_DIR model.init_from=run/best.pt model.stem_init=default"
    assert ModelConfig(name="compact_cnn", init_from="run/best.pt", stem_init="default").validate() == []
    (problem,) = ModelConfig(name="compact_cnn", stem_init="zca").validate()
    assert problem == "stem_init: must be default or whiten, got 'zca'"


@pytest.mark.slow
def test_a_run_with_a_whitened_stem_starts_from_the_first_training_images(tmp_path):
    from histo_dist.augment import eval_transform
    from histo_dist.experiment import load_experiment
    from histo_dist.loader import first_images
    from histo_dist.manifest import Manifest
    from histo_dist.train import WHITEN_IMAGES, Trainer
    from tests.runs import ROOT, make_train_shards

    shards = make_train_shards(tmp_path / "shards")
    base = [f"data.shards={shards}", "loader.num_workers=0", "tracking.wandb=false", "model.name=compact_cnn"]
    base += ["schedule.warmup_steps=2"]

    def stem(run, *overrides):
        cfg = load_experiment(ROOT / "configs/cpu_test.yaml", [*base, *overrides])
        return cfg, Trainer(cfg, tmp_path / run).module.net.stem[0].weight.detach()

    cfg, whitened = stem("a", "model.stem_init=whiten", "augment.resize=24")
    _, default = stem("b")
    expected = build_model(cfg.model, 2)
    images = first_images(Manifest.load(shards), "train", WHITEN_IMAGES, cfg.loader)
    assert len(images) == 252 and images.shape[1:] == (32, 32, 3)  # the whole split: it is smaller
    whiten_stem_(expected, eval_transform(torch.from_numpy(images).permute(0, 3, 1, 2), cfg.augment))
    assert torch.equal(whitened, expected.net.stem[0].weight)
    assert not torch.equal(whitened, default)
