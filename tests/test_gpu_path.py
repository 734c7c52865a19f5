"""What breaks on GPUs, proven where a CPU can prove it: frozen backbones, deterministic pooling, float32
logits under autocast, sync-free EMA, dropout per micro-batch, pinning by device, compiled checkpoints,
fp16's skipped steps, and BatchNorm statistics that agree across ranks. (tests/test_gpu.py runs on CUDA.)"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from histo_dist.ema import EMA
from histo_dist.models import DeterministicAdaptiveAvgPool2d, ModelConfig, build_model, make_deterministic
from histo_dist.optim import OptimConfig, build_optimizer
from tests.runs import ENV, ROOT, make_train_shards, records, run, train_cmd


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_train_shards(tmp_path_factory.mktemp("gpu-path-shards"))


def trainer_for(shards, run_dir, *overrides):
    from histo_dist.experiment import load_experiment
    from histo_dist.train import Trainer

    cfg = load_experiment(
        ROOT / "configs/cpu_test.yaml",
        [
            f"data.shards={shards}",
            "loader.batch_size=8",
            "loader.num_workers=0",
            "tracking.wandb=false",
            "tracking.progress=false",
            "schedule.warmup_steps=2",
            *overrides,
        ],
    )
    return Trainer(cfg, run_dir)


def batches(trainer, n):
    loader = iter(trainer.train_loader)
    return [next(loader) for _ in range(n)]


def test_backbone_lr_scale_zero_freezes_the_backbone():
    """Left out of the optimizer but still taking gradients, the backbone piled them up, all-reduced them
    and counted them in the clipped norm (which, under fp16, were never unscaled)."""
    model = build_model(ModelConfig(name="resnet18"), 2)
    build_optimizer(model, OptimConfig(backbone_lr_scale=0.0))
    model.train()
    assert not any(p.requires_grad for p in model.backbone_parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    assert not model.net.bn1.training  # frozen BatchNorms keep their statistics
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone_parameters())
    head_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.head_parameters()]))
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9) == pytest.approx(float(head_norm))


@pytest.mark.parametrize("size_in, size_out", [(6, 6), (2, 6), (3, 7), (7, 3), (10, 4), (96, 6)])
def test_deterministic_pool_is_adaptive_average_pooling(size_in, size_out):
    x = torch.randn(2, 5, size_in, size_in + 1, requires_grad=True)
    reference = nn.AdaptiveAvgPool2d((size_out, size_out + 1))(x)
    (grad_ref,) = torch.autograd.grad(reference.square().sum(), x)
    ours = DeterministicAdaptiveAvgPool2d((size_out, size_out + 1))(x)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), x)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_ours, grad_ref)


@pytest.mark.parametrize("name, replaced", [("simple_cnn", 1), ("vgg16_bn", 1), ("resnet18", 0), ("compact_cnn", 0)])
def test_make_deterministic_replaces_only_pools_without_a_deterministic_cuda_backward(name, replaced):
    model = make_deterministic(build_model(ModelConfig(name=name), 2))
    pools = [m for m in model.modules() if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size not in (1, (1, 1))]
    assert not pools
    assert sum(isinstance(m, DeterministicAdaptiveAvgPool2d) for m in model.modules()) == replaced


def test_logits_are_float32_under_bf16_autocast():
    """bf16 logits come in coarse steps: probabilities tie, and AUROC and thresholds with them."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="compact_cnn", width=8), 2).eval()
    x = torch.randn(512, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        features = model.net.stages(model.net.stem(x)).mean((2, 3))
        bf16_logits = model.net.fc[1](features)  # what the head gave before it ran in float32
    assert logits.dtype == torch.float32 and bf16_logits.dtype == torch.bfloat16
    assert len(torch.sigmoid(logits).unique()) == 512
    assert len(torch.sigmoid(bf16_logits.float()).unique()) < 400


def test_ema_equals_torchs_average_and_reads_nothing_on_the_host(monkeypatch):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="compact_cnn", width=4, depths=(1, 1)), 2)
    ours, theirs = EMA(model, 0.9), AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3, 16, 16))  # moves BatchNorm's running statistics
        with monkeypatch.context() as m:  # a host read of a device tensor would be a GPU sync per step
            m.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("EMA.update read a tensor on the host"))
            m.setattr(torch.Tensor, "item", lambda self: pytest.fail("EMA.update read a tensor on the host"))
            ours.update(model)
        theirs.update_parameters(model)
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        if a.is_floating_point():  # (BatchNorm's batch counter: copied here, "averaged" as an integer there)
            torch.testing.assert_close(a, b, msg=name)
    assert ours.state_dict().keys() == theirs.state_dict().keys()  # the checkpoint layout is unchanged


def test_micro_batches_of_an_accumulated_step_draw_different_dropout(shards, tmp_path):
    trainer = trainer_for(shards, tmp_path, "model.dropout=0.5", "train.grad_accum_steps=2")
    masks = []
    dropout = next(m for m in trainer.module.modules() if isinstance(m, nn.Dropout))
    dropout.register_forward_hook(lambda module, inputs, output: masks.append(output == 0))
    (batch,) = batches(trainer, 1)
    for _ in range(2):  # the same images twice: one optimizer step of two micro-batches
        trainer.train_step(batch)
    assert trainer.step == 1 and masks[0].shape == masks[1].shape
    assert not torch.equal(masks[0], masks[1])


def test_a_cpu_run_never_pins_memory(shards, tmp_path):
    from histo_dist.loader import LoaderConfig, ShardLoader
    from histo_dist.manifest import Manifest

    assert trainer_for(shards, tmp_path, "loader.pin_memory=true").train_loader.pin_memory is False
    manifest = Manifest.load(shards)
    assert ShardLoader(manifest, "train", LoaderConfig(), device_type="cuda").pin_memory is True
    assert ShardLoader(manifest, "train", LoaderConfig(pin_memory=False), device_type="cuda").pin_memory is False


@pytest.mark.slow
def test_a_compiled_runs_checkpoints_have_plain_keys_and_resume_without_compile(shards, tmp_path, monkeypatch):
    import histo_dist.train as t

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # (no C++ build)
    trainer = trainer_for(shards, tmp_path, "train.compile=true", "train.ema_decay=0.9")
    assert type(trainer.model).__name__ == "OptimizedModule" and trainer.module is not trainer.model
    for batch in batches(trainer, 2):
        trainer.train_step(batch)
    state = trainer.state_dict()
    assert not [k for k in [*state["model"], *state["ema"]] if "_orig_mod" in k]
    plain = trainer_for(shards, tmp_path / "plain")
    plain.module.load_state_dict(state["model"])  # resumable with compile off
    assert t.Trainer.inference_model(trainer).model is trainer.ema.module


def test_fp16_skipped_updates_move_neither_schedule_nor_average_nor_stop_the_run(shards, tmp_path, monkeypatch):
    """The gradient scaler skips the update of an inf/NaN step; the run goes on, as it should under fp16."""
    trainer = trainer_for(shards, tmp_path, "train.ema_decay=0.9")
    first, second = batches(trainer, 2)
    trainer.train_step(first)
    lr, ema = trainer.optimizer.param_groups[0]["lr"], {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    real_loss = trainer.loss
    monkeypatch.setattr(trainer, "loss", lambda logits, labels: real_loss(logits, labels) * float("inf"))
    monkeypatch.setattr(type(trainer.optimizer), "step_was_skipped", property(lambda self: True))
    trainer.train_step(second)
    assert trainer.step == 2 and trainer.optimizer.param_groups[0]["lr"] == lr
    assert all(torch.equal(v, ema[k]) for k, v in trainer.ema.state_dict().items() if k != "n_averaged")
    loss, _ = trainer.flush_losses()  # no NonFiniteLossError: the scaler skipped that step
    assert loss == loss  # the mean of the finite ones


@pytest.mark.slow
def test_two_ranks_validate_one_model_the_one_checkpointed(shards, tmp_path):
    """BatchNorm statistics differ per rank; validation scores rank 0's on every rank, so best.pt (rank 0's)
    evaluated alone gives the metrics the run logged for it."""
    run_dir = tmp_path / "run"
    overrides = [
        "model.name=compact_cnn",
        "model.width=4",
        "model.depths=[1,1]",
        "loader.batch_size=8",
        "loader.eval_batch_size=16",
        "loader.num_workers=0",
        "train.epochs=1",
        "train.eval_every_steps=5",
        "tracking.progress=false",
        "tracking.wandb=false",
        "schedule.warmup_steps=2",
        "data.test_split=",
        "train.ema_decay=0.8",
    ]
    out = run(train_cmd(shards, run_dir, *overrides, ranks=2), timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    best_step = torch.load(run_dir / "checkpoints/best.pt", weights_only=True)["step"]
    logged = next(r for r in records(run_dir, "valid") if r["step"] == best_step)
    evaluated = tmp_path / "eval"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo_dist",
            "evaluate",
            "--checkpoint",
            str(run_dir / "checkpoints/best.pt"),
            "--data",
            str(shards),
            "--split",
            "valid",
            "--output",
            str(evaluated),
            "--batch-size",
            "16",
            "--num-workers",
            "0",
            "--bootstrap",
            "0",
            "--no-plots",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((evaluated / "metrics.json").read_text())
    for name in ("auroc", "accuracy", "nll"):
        assert metrics[name] == pytest.approx(logged[name], abs=1e-6), name
