"""The GPU check: the risky CUDA paths exercised in one command (a few minutes on one GPU), PASS/FAIL each.

    benchmarks/gpu_check.sh                 # on a GPU machine; without CUDA: "SKIP", exit 0
    python benchmarks/gpu_check.py --device cpu   # the same checks on the CPU (for developing this script)

Paths: bf16 and fp16 training (EMA, channels_last, device augmentation), deterministic training
(simple_cnn's adaptive pooling) resumed after SIGUSR1 bitwise equal to an uninterrupted run,
`histo-dist evaluate` with TTA, torch.compile (plain checkpoint keys), device augmentation equal to CPU
augmentation, host-device syncs per optimizer step (torch.cuda.set_sync_debug_mode), and figures:
training images/s of resnet18, resnet50, compact_cnn and the fast GPU recipe's model and batch (with 4, 8 and 14
loader workers, and cudnn.benchmark) at 96 px (bf16, channels_last, eager) and the loader's share of step time.
Exit 1 if any path fails. `--only TEXT[,TEXT]` runs the checks whose names contain a text.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS: list[tuple[str, str, str]] = []
ONLY: list[str] = []
"""When set (--only), run just the checks whose name contains one of these texts."""


def check(name: str):
    """Run the decorated check now; record PASS (its figure), SKIP or FAIL (the error)."""

    def run(fn):
        if ONLY and not any(text.lower() in name.lower() for text in ONLY):
            return fn
        t = time.monotonic()
        try:
            detail = fn() or ""
            status = "SKIP" if detail.startswith("skip:") else "PASS"
        except Exception as e:  # noqa: BLE001 - every failure is a result to report
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        detail = f"{detail} ({time.monotonic() - t:.0f} s)"
        RESULTS.append((status, name, detail))
        print(f"{status:4}  {name}: {detail}", flush=True)
        return fn

    return run


def histo(*args: str, env: dict, timeout: float = 600, check_rc: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "histo_dist", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )
    if check_rc and out.returncode != 0:
        raise RuntimeError(f"histo-dist {args[0]} exited {out.returncode}: {out.stderr[-2000:]}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="gpu-check-")))
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated texts: run only the checks whose name contains one (e.g. 'augmentation,images/s')",
    )
    args = parser.parse_args()
    ONLY.extend(t.strip() for t in args.only.split(",") if t.strip())

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device here (torch.cuda.is_available() is False); nothing was checked")
        return 0
    cuda = args.device == "cuda"
    cpu = ["train.cpu=true", "model.name=compact_cnn"] if not cuda else []  # (a CPU runs the plumbing, small)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "1"
    work = args.work
    print(f"gpu check on {torch.cuda.get_device_name() if cuda else 'the CPU'}, torch {torch.__version__}, in {work}")

    # A small synthetic PCam (96 px) converted to shards: 8192 train on a GPU (16 batches of the fast recipe's 512)
    # or 4096 on the CPU, 512 valid and test.
    shards = work / "shards"
    histo(
        "synth",
        "--output",
        str(work / "synth"),
        "--n-train",
        "8192" if cuda else "4096",
        "--n-valid",
        "512",
        "--n-test",
        "512",
        "--overwrite",
        env=env,
    )
    histo("convert", "--input", str(work / "synth"), "--output", str(shards), "--overwrite", "--no-progress", env=env)
    base = [
        "--config",
        "configs/pcam_resnet18_gpu.yaml",
        f"data.shards={shards}",
        "tracking.wandb=false",
        "tracking.progress=false",
        "train.max_steps=40",
        "train.eval_every_steps=20",
        "checkpoint.every_steps=20",
        "loader.batch_size=64",
        "loader.eval_batch_size=256",
        "loader.num_workers=2",
        "schedule.warmup_steps=5",
        "test.bootstrap=100",
        *cpu,
    ]

    def train(run_dir: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
        return histo("train", *base, "--run-dir", str(run_dir), *overrides, env=env, **kw)

    def finite_test_auroc(run_dir: Path) -> str:
        metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
        assert 0.0 <= metrics["auroc"] <= 1.0, metrics
        return f"test AUROC {metrics['auroc']:.3f}"

    @check("bf16 training (EMA, channels_last, device augmentation)")
    def _():
        train(work / "bf16", "train.mixed_precision=bf16", "train.ema_decay=0.99")
        return finite_test_auroc(work / "bf16")

    @check("fp16 training (gradient scaler)")
    def _():
        if not cuda:
            return "skip: fp16 needs a GPU"
        train(work / "fp16", "train.mixed_precision=fp16", "train.ema_decay=0.99")
        return finite_test_auroc(work / "fp16")

    @check("deterministic simple_cnn, SIGUSR1 then resume == uninterrupted (bitwise)")
    def _():
        det = [
            "model.name=simple_cnn",
            "train.deterministic=true",
            "augment.where=device",
            "loader.num_workers=0",
            "tracking.log_every_steps=1",
            "train.mixed_precision=no",
            "checkpoint.every_steps=0",
        ]
        train(work / "det-ref", *det)
        cmd = [sys.executable, "-m", "histo_dist", "train", *base, "--run-dir", str(work / "det-run"), *det]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        metrics = work / "det-run" / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 15):
            assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-2000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) == 75, f"exit {proc.returncode}: {proc.stderr.read()[-2000:]}"
        train(work / "det-run", *det)
        from histo_dist.checkpoint import load_checkpoint

        a = load_checkpoint(sorted((work / "det-ref" / "checkpoints").glob("step-*.pt"))[-1])
        b = load_checkpoint(sorted((work / "det-run" / "checkpoints").glob("step-*.pt"))[-1])
        assert a["step"] == b["step"] == 40
        differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
        assert not differ, f"weights differ: {differ[:3]}"
        return "bitwise equal"

    @check("histo-dist evaluate --tta --threshold youden")
    def _():
        out = histo(
            "evaluate",
            "--checkpoint",
            str(work / "bf16/checkpoints/best.pt"),
            "--data",
            str(shards),
            "--output",
            str(work / "eval"),
            "--tta",
            "--threshold",
            "youden",
            "--mixed-precision",
            "bf16",
            "--bootstrap",
            "100",
            "--no-progress",
            *(["--cpu"] if not cuda else []),
            env=env,
        )
        metrics = json.loads((work / "eval" / "metrics.json").read_text())
        assert "tta" in metrics, out.stdout
        return f"AUROC {metrics['auroc']:.3f}, TTA {metrics['tta']['auroc']:.3f}"

    @check("torch.compile (checkpoint keys without _orig_mod.)")
    def _():
        train(work / "compile", "train.compile=true", "train.mixed_precision=bf16", "train.max_steps=20")
        from histo_dist.checkpoint import load_checkpoint

        state = load_checkpoint(work / "compile" / "checkpoints" / "best.pt")
        assert not [k for k in state["model"] if "_orig_mod" in k]
        return "plain keys"

    @check("device augmentation == CPU augmentation")
    def _():
        if not cuda:
            return "skip: needs a GPU"
        from histo_dist.augment import AugmentConfig, _resize, augment

        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (64, 3, 96, 96), dtype=torch.uint8, generator=g)
        seeds = torch.arange(64, dtype=torch.int64) * 7919
        # Without resize the two devices compute the same float ops: equal to rounding.
        cfg = AugmentConfig(rotate_degrees=15.0, crop=80, crop_jitter=4)
        on_gpu, on_cpu = augment(x.cuda(), seeds.cuda(), cfg).cpu(), augment(x, seeds, cfg)
        diff = (on_gpu - on_cpu).abs().max().item()
        assert diff < 1e-3, f"without resize: max difference {diff}"
        # Resize runs torch's uint8 kernel on the CPU and a float kernel rounded to uint8 elsewhere (its docstring):
        # at most one level apart. Augmentation after it (stain jitter in optical density) can widen that.
        levels = (_resize(x.cuda(), 64).cpu().int() - _resize(x, 64).int()).abs()
        assert levels.max().item() <= 1, f"resize: {levels.max().item()} levels apart"
        cfg = AugmentConfig(rotate_degrees=15.0, crop=80, crop_jitter=4, resize=64)
        on_gpu, on_cpu = augment(x.cuda(), seeds.cuda(), cfg).cpu(), augment(x, seeds, cfg)
        resized = (on_gpu - on_cpu).abs()
        alone = augment(x[5:6].cuda(), seeds[5:6].cuda(), cfg).cpu()
        assert torch.equal(alone[0], on_gpu[5]), "depends on the batch"
        return (
            f"max difference {diff:.1e} without resize; resize differs by <= 1 level in "
            f"{(levels > 0).float().mean().item():.0%} of pixels, and after the whole augmentation by at most "
            f"{resized.max().item():.3f} (mean {resized.mean().item():.1e}, normalised units); batch-independent"
        )

    trainer_cache = {}

    def trainer(name: str, batch: int, config: str = "configs/pcam_resnet18_gpu.yaml", *extra: str):
        from histo_dist.experiment import load_experiment
        from histo_dist.train import Trainer

        overrides = [
            f"data.shards={shards}",
            "tracking.wandb=false",
            "train.mixed_precision=bf16",
            "augment.where=device",
            "loader.num_workers=4",
            *cpu,
            f"model.name={name}",
            f"loader.batch_size={batch}",
            "train.compile=false",  # the same eager model for every row (compile is checked above)
            *extra,
        ]
        cfg = load_experiment(ROOT / config, overrides)
        trainer_cache["runs"] = trainer_cache.get("runs", 0) + 1
        run_dir = work / f"bench-{trainer_cache['runs']}-{name}"
        return Trainer(cfg, run_dir, accelerator=trainer_cache.get("acc"))

    @check("host-device syncs per optimizer step (bf16, no logging step)")
    def _():
        if not cuda:
            return "skip: needs a GPU"
        t = trainer("resnet18", 128)
        trainer_cache["acc"] = t.accelerator
        loader = iter(t.train_loader)
        for _ in range(3):
            t.train_step(next(loader))  # warm-up
        batches = [next(loader) for _ in range(10)]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for b in batches:
                    t.train_step(b)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        return f"{len(syncs) / len(batches):.1f} per step" + (f" at {', '.join(sites[:6])}" if sites else "")

    @check("training images/s at 96 px (bf16, channels_last) and the loader's share of step time")
    def _():
        figures = []
        recipe = ("compact_resnet", 512, "configs/pcam_fast_gpu.yaml")  # the fast GPU recipe's model and batch
        rows = (  # (model, batch, config, overrides, cudnn.benchmark)
            [
                ("resnet18", 256, "configs/pcam_resnet18_gpu.yaml", [], False),
                ("resnet50", 256, "configs/pcam_resnet18_gpu.yaml", [], False),
                ("compact_cnn", 256, "configs/pcam_resnet18_gpu.yaml", [], False),
                (*recipe, [], False),
                (*recipe, ["loader.num_workers=8"], False),
                (*recipe, ["loader.num_workers=14"], False),
                (*recipe, ["loader.num_workers=8"], True),
            ]
            if cuda
            else [("compact_resnet", 64, recipe[2], ["model.width=16"], False)]
        )
        for name, batch, config, extra, benchmark in rows:
            torch.backends.cudnn.benchmark = benchmark
            # the schedule's warmup must fit in the run's steps; it does not change the speed
            t = trainer(name, batch, config, "schedule.warmup_steps=10", *extra)
            trainer_cache.setdefault("acc", t.accelerator)
            loader = iter(t.train_loader)
            held = [next(loader) for _ in range(3)]
            for b in held:
                t.train_step(b)  # warm-up (cudnn autotuning, first allocations)

            def timed(batches, t=t) -> float:
                if cuda:
                    torch.cuda.synchronize()
                start, n = time.perf_counter(), 0
                for b in batches:
                    t.train_step(b)
                    n += len(b["label"])
                if cuda:
                    torch.cuda.synchronize()
                return n / (time.perf_counter() - start)

            compute = timed([held[i % 3] for i in range(12)])  # batches already in memory: the model alone
            steps = max(1, min(len(t.train_loader) - 4, 12))
            pipeline = timed(next(loader) for _ in range(steps))  # through the loader
            share = max(0.0, 1 - pipeline / compute)
            label = " ".join([f"batch {batch}", *extra, *(["cudnn.benchmark"] if benchmark else [])])
            figures.append(
                f"{name} ({label}) {pipeline:.0f} img/s (model alone {compute:.0f}, loader share {share:.0%})"
            )
            del t, loader, held  # the loader's workers end before the next row's start
        torch.backends.cudnn.benchmark = False
        return "; ".join(figures)

    if ONLY and not RESULTS:
        print(f"error: --only {args.only!r} matches no check's name; nothing was checked", file=sys.stderr)
        return 2
    failed = [r for r in RESULTS if r[0] == "FAIL"]
    print(
        f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} paths passed or skipped"
        + (f"; FAILED: {', '.join(name for _, name, _ in failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
