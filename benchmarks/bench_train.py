"""Training-loop overhead: our Trainer against a minimal hand-written PyTorch loop, same everything.

    python benchmarks/bench_train.py [--model simple_cnn] [--batch 64] [--steps 20] [--repeats 3]
                                     [--device cpu|cuda] [--precision no|bf16]

Both loops get the same model architecture and initial weights, the same in-memory uint8 batches,
the same normalisation, loss (BCE with logits), optimizer (AdamW) and memory format. Ours runs
`Trainer.train_step` (Accelerate's accumulate/backward, schedule, EMA off, loss kept on the device);
the baseline is forward, loss, backward, step, zero_grad. Runs alternate (ours, baseline, ...) so
that machine noise hits both; the best run of each is compared. Prints images/s and the overhead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()

    from histo_dist.augment import eval_transform
    from histo_dist.experiment import load_experiment
    from histo_dist.models import build_model
    from histo_dist.train import Trainer
    from tests.shard_data import make_dataset

    tmp = Path(tempfile.mkdtemp())
    make_dataset(tmp / "shards", {"train": [args.batch * 4], "valid": [8], "test": [8]}, shape=(96, 96, 3))
    cfg = load_experiment(
        None,
        [
            f"data.shards={tmp / 'shards'}",
            f"model.name={args.model}",
            "augment.enabled=false",
            "tracking.wandb=false",
            f"loader.batch_size={args.batch}",
            "loader.num_workers=0",
            "optim.name=adamw",
            "schedule.name=constant",
            f"train.cpu={str(args.device == 'cpu').lower()}",
            f"train.mixed_precision={args.precision}",
        ],
    )
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "image": torch.randint(0, 256, (args.batch, 96, 96, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2),
            "label": torch.randint(0, 2, (args.batch,), generator=g),
            "seed": torch.arange(args.batch),
        }
        for _ in range(args.steps)
    ]

    trainer = Trainer(cfg, tmp / "run")
    device = trainer.device

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, 2).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> float:
        sync()
        t = time.perf_counter()
        for batch in batches:
            trainer.train_step(batch)
        trainer.flush_losses()  # the loop's one sync point per log interval
        sync()
        return args.steps * args.batch / (time.perf_counter() - t)

    def baseline() -> float:
        sync()
        t = time.perf_counter()
        model.train()
        for batch in batches:
            images = eval_transform(batch["image"].to(device, non_blocking=True), cfg.augment)
            images = images.contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            with autocast:
                logits = model(images)
            loss = loss_fn(logits.reshape(-1).float(), labels.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        return args.steps * args.batch / (time.perf_counter() - t)

    ours(), baseline()  # warm-up (allocator, kernels, lazy init)
    results = {"ours": [], "baseline": []}
    for _ in range(args.repeats):
        results["ours"].append(ours())
        results["baseline"].append(baseline())
    best_ours, best_base = max(results["ours"]), max(results["baseline"])
    print(
        f"train-loop benchmark: {args.model}, batch {args.batch}, {args.steps} steps x {args.repeats} repeats, "
        f"{device.type}, precision {args.precision}"
    )
    print(
        f"  minimal PyTorch loop : {best_base:9.0f} img/s  (runs: {', '.join(f'{r:.0f}' for r in results['baseline'])})"
    )
    print(f"  histo-dist Trainer   : {best_ours:9.0f} img/s  (runs: {', '.join(f'{r:.0f}' for r in results['ours'])})")
    print(f"  overhead             : {100 * (best_base - best_ours) / best_base:+.1f}%  (target < 5%)")
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
