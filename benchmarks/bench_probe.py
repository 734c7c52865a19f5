"""A head on embeddings under kaiko-ai/eva's protocol (12,500 steps of batch 256), timed as users run it.

    python benchmarks/bench_probe.py [--dim 384] [--train 262144] [--eval 32768] [--steps 12500] [--seeds 1]
                                     [--model linear_probe] [--out /tmp/bench-probe]

Writes PCam-sized embedding shards once (random float16 vectors of `--dim` values whose label shifts a few
coordinates: learnable, as real features are), then runs `histo-dist train --config configs/probe_eva.yaml`
on them in a subprocess, the way a user does, and prints: the command's wall time; the loop's steps per
second, between the first and the last training record of metrics.jsonl (validations and checkpoints at
the end of each epoch included); and the start-up (imports, reading the embeddings, building the model)
before the first step. Each seed is one run; with --seeds 5 the command is eva's whole protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_embeddings(root: Path, dim: int, sizes: dict[str, int], per_shard: int = 8192) -> None:
    from histo_dist.manifest import Manifest, SplitInfo, sample_key, shard_name
    from histo_dist.shards import write_shard

    if (root / "manifest.json").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    direction = rng.normal(0, 1, dim) / np.sqrt(dim)
    splits = {}
    for split, n in sizes.items():
        labels = rng.integers(0, 2, n)
        vectors = (rng.normal(0, 1, (n, dim)) + np.outer(2 * labels - 1, direction) * 4).astype(np.float16)
        infos = []
        for i, start in enumerate(range(0, n, per_shard)):
            stop = min(n, start + per_shard)
            keys = [sample_key(split, j) for j in range(start, stop)]
            infos.append(
                write_shard(root / shard_name(split, i), keys, vectors[start:stop], labels[start:stop], None, "npy", 2)
            )
        counts = tuple(int(c) for c in np.bincount(labels, minlength=2))
        splits[split] = SplitInfo(n, counts, False, tuple(infos))
    manifest = Manifest("npy", (dim,), ("normal", "tumor"), splits, {"format": "benchmark"}, per_shard, None, "bench")
    Manifest(**{**manifest.__dict__, "root": root, "dtype": "float16"}).save(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=384, help="embedding size (ViT-S 384, ViT-L 1024, ViT-H 1280)")
    parser.add_argument("--train", type=int, default=262_144, help="training embeddings (PCam: 262,144)")
    parser.add_argument("--eval", type=int, default=32_768, help="validation and test embeddings each (PCam: 32,768)")
    parser.add_argument("--steps", type=int, default=12_500)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--model", default="linear_probe")
    parser.add_argument("--out", default="/tmp/bench-probe")
    args = parser.parse_args()

    out = Path(args.out)
    data = out / f"embeddings-{args.dim}-{args.train}"
    t0 = time.perf_counter()
    write_embeddings(data, args.dim, {"train": args.train, "valid": args.eval, "test": args.eval})
    print(
        f"embeddings: {data} ({args.train:,} train, {args.eval:,} valid and test, {args.dim} values; "
        f"{time.perf_counter() - t0:.0f} s to write or find)"
    )
    run_dir = out / f"run-{args.model}-{args.dim}-{args.seeds}-{int(time.time())}"
    seeds = list(range(args.seeds))
    cmd = [
        sys.executable,
        "-m",
        "histo_dist",
        "train",
        "--config",
        str(ROOT / "configs/probe_eva.yaml"),
        "--run-dir",
        str(run_dir),
        f"data.shards={data}",
        f"model.name={args.model}",
        f"train.max_steps={args.steps}",
        f"train.seeds={seeds}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - start
    if proc.returncode != 0:
        sys.exit(f"the run failed:\n{proc.stderr[-3000:]}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"histo-dist train, {args.model}, {args.steps:,} steps of batch 256, {args.seeds} seed(s): {wall:.1f} s wall")
    for seed in seeds:
        lines = (run_dir / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
        train = [r for r in records if r["kind"] == "train"]
        test = next(r for r in records if r["kind"] == "test")
        loop_s = train[-1]["time"] - train[0]["time"]
        steps = train[-1]["step"] - train[0]["step"]
        first_step_at = train[0]["time"] - start - train[0]["step"] / (steps / loop_s)
        print(
            f"  seed {seed}: loop {steps / loop_s:,.0f} steps/s ({loop_s:.1f} s for {steps:,} steps, validations and "
            f"checkpoints included); first step ~{first_step_at:.1f} s after the start; test balanced accuracy "
            f"{test['balanced_accuracy']:.4f}"
        )
    summary = json.loads((run_dir / "seeds.json").read_text())["metrics"]["balanced_accuracy"]
    print(f"  test balanced accuracy over seeds: {summary['mean']:.4f} ± {summary['std']:.4f}")


if __name__ == "__main__":
    main()
