"""timm backbones: built by name with kwargs, staged and frozen, their input from their pretrained config, and
weights from a local file or the local Hugging Face cache, never the network. Small, randomly initialised
models only (a 32 px ViT-Tiny, timm's test_vit, a timm ResNet-18)."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from histo_dist.config import ConfigError
from histo_dist.experiment import load_experiment
from histo_dist.models import (
    ModelConfig,
    ModelError,
    build_model,
    check_input_side,
    freeze_choices,
    input_defaults,
)
from histo_dist.optim import OptimConfig, build_optimizer
from tests.test_models import assert_stages_split_the_backbone

VIT = {"name": "timm/vit_tiny_patch16_224", "kwargs": {"img_size": 32}}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt (torch hub, a raw socket) fails the test loudly, and timm's Hugging Face lookups
    must run in offline mode (answered from the local cache or not at all)."""
    import huggingface_hub.constants
    import timm.models._hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    lookup = timm.models._hub.hf_hub_download

    def offline_only(*args, **kwargs):
        assert huggingface_hub.constants.HF_HUB_OFFLINE, f"a Hugging Face lookup outside offline mode: {args!r}"
        return lookup(*args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", offline_only)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty local Hugging Face cache."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_hf_cache(cache, repo: str, filename: str, write) -> None:
    """A file laid out as `hf download` leaves it: models--org--name/snapshots/<commit>/<file>, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    write(folder / "snapshots" / commit / filename)


def backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.net.state_dict().items() if not k.startswith(model.head_path + ".")}


# ---------------------------------------------------------------------------------------------
# Building, stages, freezing


@pytest.mark.parametrize(
    "cfg, side",
    [(VIT, 32), ({"name": "timm/resnet18"}, 64), ({"name": "timm/test_vit"}, 160)],
    ids=["vit_tiny", "resnet18", "test_vit"],
)
def test_a_timm_model_gives_its_logits_and_its_stages_split_the_backbone(cfg, side):
    cfg = ModelConfig(**cfg)
    with torch.no_grad():
        assert build_model(cfg, 2)(torch.randn(2, 3, side, side)).shape == (2, 1)
        model = build_model(cfg, 3)
        assert model(torch.randn(2, 3, side, side)).shape == (2, 3)
    assert_stages_split_the_backbone(model, cfg)


def test_stages_are_timms_groups_named_by_where_they_start():
    assert freeze_choices(ModelConfig(**VIT)) == ("none", "all", "stem", *(f"blocks.{i}" for i in range(12)))
    assert freeze_choices(ModelConfig(name="timm/resnet18")) == (
        "none",
        "all",
        "stem",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    )


def test_freezing_a_stage_freezes_the_stem_up_to_it_and_the_backbone_lr_scale_applies():
    model = build_model(ModelConfig(**VIT, freeze="blocks.5"), 2)
    for name, p in model.net.named_parameters():
        frozen = name in ("cls_token", "pos_embed") or name.startswith(
            ("patch_embed.", *(f"blocks.{i}." for i in range(6)))
        )
        assert p.requires_grad != frozen, name
    groups = build_optimizer(model, OptimConfig(lr=1e-3, backbone_lr_scale=0.1)).param_groups
    head = {id(p) for p in model.head_parameters()}
    assert {g["lr"] for g in groups if any(id(p) in head for p in g["params"])} == {1e-3}
    assert {g["lr"] for g in groups if not any(id(p) in head for p in g["params"])} == {1e-4}
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}


def test_kwargs_naming_classes_are_resolved_and_reach_timm():
    from timm.layers import GluMlp  # SwiGLUPacked is a partial of it

    cfg = ModelConfig(
        name="timm/test_vit",
        kwargs={
            "mlp_layer": "timm.layers.SwiGLUPacked",
            "act_layer": "torch.nn.SiLU",
            "init_values": 1e-5,
            "num_classes": 0,  # as model cards give it: ignored, the new head is ours
        },
    )
    model = build_model(cfg, 2)
    block = model.net.blocks[0]
    assert isinstance(block.mlp, GluMlp) and isinstance(block.mlp.act, torch.nn.SiLU)
    assert float(block.ls1.gamma[0].detach()) == pytest.approx(1e-5)


def test_config_mistakes_of_timm_models_are_named():
    with pytest.raises(ConfigError) as error:
        build_model(ModelConfig(name="timm/vit_tiny_patch16_225"), 2)
    assert "timm/vit_tiny_patch16_225" in str(error.value) and "did you mean 'timm/vit_tiny_patch16_224'" in str(
        error.value
    )
    with pytest.raises(ConfigError, match=r"kwargs.mlp_layer: 'timm.layers.NoSuchLayer' names nothing importable"):
        build_model(ModelConfig(name="timm/test_vit", kwargs={"mlp_layer": "timm.layers.NoSuchLayer"}), 2)
    with pytest.raises(ConfigError, match=r"failed: TypeError.*no_such_argument"):
        build_model(ModelConfig(name="timm/test_vit", kwargs={"no_such_argument": 1}), 2)
    with pytest.raises(
        ConfigError, match=r"freeze: timm/resnet18 has no stage 'blocks.3'; valid: none, all, stem, layer1"
    ):
        build_model(ModelConfig(name="timm/resnet18", freeze="blocks.3"), 2)
    with pytest.raises(ConfigError, match=r"kwargs: only timm models take keyword arguments"):
        build_model(ModelConfig(name="resnet18", kwargs={"img_size": 32}), 2)
    with pytest.raises(ConfigError, match=r"'imagenet' is a torchvision weights name; a timm model takes 'hub'"):
        build_model(ModelConfig(name="timm/resnet18", pretrained="imagenet"), 2)


# ---------------------------------------------------------------------------------------------
# Input


def test_input_size_and_normalisation_come_from_the_pretrained_config_unless_given():
    assert input_defaults(ModelConfig(name="timm/test_vit")) == {"resize": 160, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert input_defaults(ModelConfig(**VIT))["resize"] == 32  # model.kwargs.img_size wins
    assert input_defaults(ModelConfig(name="resnet18")) == {}
    cfg = load_experiment(None, ["model.name=timm/resnet18"])
    assert (cfg.augment.resize, cfg.augment.mean, cfg.augment.where) == (224, (0.485, 0.456, 0.406), "device")
    cfg = load_experiment(None, ["model.name=timm/test_vit", "augment.resize=96", "augment.where=worker"])
    assert (cfg.augment.resize, cfg.augment.mean, cfg.augment.where) == (96, (0.5, 0.5, 0.5), "worker")
    assert load_experiment(None, ["model.name=resnet18"]).augment.resize == 0  # other models: as before


def test_a_fixed_size_vit_refuses_another_input_side_naming_the_fixes():
    check_input_side(ModelConfig(**VIT), 32, "data")
    with pytest.raises(ModelError, match=r"takes 32x32 inputs, and gets 96x96: set augment.resize=32, or model.kwargs"):
        check_input_side(ModelConfig(**VIT), 96, "data")
    check_input_side(ModelConfig(name=VIT["name"], kwargs={"img_size": 32, "dynamic_img_size": True}), 96, "data")
    check_input_side(ModelConfig(name="timm/resnet18"), 96, "data")  # CNNs take any side


# ---------------------------------------------------------------------------------------------
# Weights: a local file or the local Hugging Face cache, never a download


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_local_weights_file_round_trip(tmp_path, suffix):
    import timm

    source = timm.create_model("vit_tiny_patch16_224", img_size=32)  # stands in for a downloaded file, head included
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    model = build_model(ModelConfig(**VIT, pretrained=str(path)), 2)
    expected = {k: v for k, v in state.items() if not k.startswith("head.")}
    got = backbone_state(model)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert "state_dict" not in model.net.pretrained_cfg  # no second copy of the weights kept


def test_weights_saved_at_224_load_into_a_smaller_vit_with_resampled_position_embeddings(tmp_path):
    import timm

    torch.save(timm.create_model("vit_tiny_patch16_224").state_dict(), tmp_path / "w224.pth")
    model = build_model(ModelConfig(**VIT, pretrained=str(tmp_path / "w224.pth")), 2)
    assert model.net.pos_embed.shape == (1, 1 + 2 * 2, 192)


def test_a_weights_file_of_another_model_is_refused_naming_the_file(tmp_path):
    import timm

    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ModelError) as error:
        build_model(ModelConfig(**VIT, pretrained=str(tmp_path / "resnet.pth")), 2)
    message = str(error.value)
    assert str(tmp_path / "resnet.pth") in message and "does not fit timm/vit_tiny_patch16_224" in message
    assert "Missing key(s)" in message
    with pytest.raises(ModelError, match=r"no such file; give 'hub'"):
        build_model(ModelConfig(**VIT, pretrained=str(tmp_path / "nope.pth")), 2)


def test_hub_weights_missing_from_the_cache_name_the_repo_the_command_and_the_folder(hf_cache):
    with pytest.raises(ModelError) as error:
        build_model(ModelConfig(name="timm/resnet18", pretrained="hub"), 2)
    message = str(error.value)
    assert "timm/resnet18.a1_in1k" in message and str(hf_cache) in message
    assert "hf download timm/resnet18.a1_in1k model.safetensors" in message
    assert "never downloads" in message and str(hf_cache / "models--timm--resnet18.a1_in1k") in message


def test_hub_weights_load_from_the_local_hugging_face_cache(hf_cache):
    import timm

    source = timm.create_model("resnet18")
    with torch.no_grad():
        source.bn1.running_mean.uniform_()
    put_in_hf_cache(hf_cache, "timm/resnet18.a1_in1k", "model.safetensors", lambda p: save_file(source.state_dict(), p))
    model = build_model(ModelConfig(name="timm/resnet18", pretrained="hub"), 2)
    assert torch.equal(model.net.bn1.running_mean, source.bn1.running_mean)
    assert torch.equal(model.net.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_an_hf_hub_model_needs_its_config_in_the_cache_and_builds_from_it(hf_cache):
    import json

    with pytest.raises(ConfigError) as error:
        build_model(ModelConfig(name="timm/hf-hub:someone/pathology-vit"), 2)
    assert "hf download someone/pathology-vit config.json model.safetensors" in str(error.value)
    config = {
        "architecture": "vit_tiny_patch16_224",
        "model_args": {"img_size": 32},
        "pretrained_cfg": {
            "input_size": [3, 32, 32],
            "mean": [0.7, 0.6, 0.8],
            "std": [0.1, 0.2, 0.3],
            "num_classes": 0,
            "classifier": "head",
        },
    }
    put_in_hf_cache(hf_cache, "someone/pathology-vit", "config.json", lambda p: p.write_text(json.dumps(config)))
    cfg = ModelConfig(name="timm/hf-hub:someone/pathology-vit")
    assert input_defaults(cfg) == {"resize": 32, "mean": (0.7, 0.6, 0.8), "std": (0.1, 0.2, 0.3)}
    assert build_model(cfg, 2)(torch.randn(1, 3, 32, 32)).shape == (1, 1)
    with pytest.raises(ModelError, match=r"hf download someone/pathology-vit model.safetensors"):
        build_model(ModelConfig(name=cfg.name, pretrained="hub"), 2)
