"""CUDA-only tests (marker `gpu`: skipped, and shown as skipped, where no GPU is present). The CPU side of
the same fixes is in tests/test_gpu_path.py; benchmarks/gpu_check.sh exercises whole runs on a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from histo_dist.ema import EMA
from histo_dist.models import ModelConfig, build_model, make_deterministic
from tests.runs import ROOT

gpu = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs for real (minutes)")
def test_the_gpu_check_skips_without_cuda_and_says_so():
    out = subprocess.run(
        [str(ROOT / "benchmarks/gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("SKIP: no CUDA device") and "PASS" not in out.stdout


@gpu
def test_deterministic_backward_of_simple_cnn_and_vgg_runs_on_cuda():
    """AdaptiveAvgPool2d (non-1x1 outputs) has no deterministic CUDA backward: it raised at the first step."""
    torch.use_deterministic_algorithms(True)
    try:
        for name in ("simple_cnn", "vgg16_bn"):
            model = make_deterministic(build_model(ModelConfig(name=name), 2)).cuda()
            model(torch.randn(4, 3, 96, 96, device="cuda")).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@gpu
def test_ema_update_does_not_synchronise():
    model = build_model(ModelConfig(name="compact_cnn", width=8), 2).cuda()
    ema = EMA(model, 0.99)
    ema.update(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ema.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_logits_are_float32_under_bf16_autocast_on_cuda():
    model = build_model(ModelConfig(name="resnet18"), 2).cuda().eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(torch.randn(256, 3, 96, 96, device="cuda"))
    assert logits.dtype == torch.float32 and len(logits.unique()) == 256
