"""Does a probe learn what the features hold? Linear probes on real PCam patches, on the embeddings of a
randomly initialised CNN and of the same CNN trained for a few minutes.

    histo-dist convert --input ../shared/data/pcam-real-20k --format imagefolder --output /tmp/pcam-real-20k
    python benchmarks/probe_quality.py --data /tmp/pcam-real-20k [--out /tmp/probe-quality] [--budget 300s]
                                       [--seeds 5] [--steps 12500]

Steps, each with the commands a user runs (skipped when its output is already there): train compact_cnn
with a time budget on the train split (the best checkpoint by validation AUROC); embed train and valid
with the random network (`model.name=compact_cnn`, seed 0) and with that checkpoint; train linear probes
on both with configs/probe_eva.yaml (eva's 12,500 steps of batch 256, 5 seeds), tested on the valid
split at threshold 0.5 with no checkpoint selection (pcam-real-20k has no test split, so the probes do
not see valid before their test: data.valid_split is empty and the last step is tested). Prints the
CNN's own valid metrics, then mean ± std over seeds of the probes' balanced accuracy and AUROC, and
the time of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def histo_dist(*args: str) -> float:
    """Run a histo-dist command as a user does; its wall time."""
    start = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "histo_dist", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"histo-dist {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="pcam-real-20k converted to shards")
    parser.add_argument("--out", default="/tmp/probe-quality")
    parser.add_argument("--budget", default="300s", help="the CNN's training time (train.time_budget)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=12_500)
    args = parser.parse_args()
    out, data = Path(args.out), Path(args.data)
    times = {}

    cnn = out / "cnn"
    if not (cnn / "checkpoints/best.pt").exists():
        times["train compact_cnn"] = histo_dist(
            "train", "--config", str(ROOT / "configs/cpu_test.yaml"), "--run-dir", str(cnn), f"data.shards={data}",
            "data.test_split=", "model.name=compact_cnn", "loader.batch_size=128", "augment.where=device",
            "train.mixed_precision=auto", f"train.time_budget={args.budget}", "schedule.warmup_steps=20",
            "tracking.progress=false",
        )  # fmt: skip
    valid = [json.loads(x) for x in (cnn / "metrics.jsonl").read_text().splitlines() if '"valid"' in x]
    best = max(valid, key=lambda r: r["auroc"])

    embeddings = {"random": out / "emb-random", "trained": out / "emb-trained"}
    backbones = {"random": ["model.name=compact_cnn"], "trained": ["--checkpoint", str(cnn / "checkpoints/best.pt")]}
    for name, folder in embeddings.items():
        if not (folder / "manifest.json").exists():
            times[f"embed ({name})"] = histo_dist(
                "embed", "--data", str(data), "--output", str(folder), "--overwrite", "--no-progress", *backbones[name]
            )

    results = {}
    for name, folder in embeddings.items():
        run = out / f"probe-{name}"
        if not (run / "seeds.json").exists():
            times[f"probe ({name}, {args.seeds} seeds)"] = histo_dist(
                "train", "--config", str(ROOT / "configs/probe_eva.yaml"), "--run-dir", str(run),
                f"data.shards={folder}", "data.valid_split=", "data.test_split=valid", f"train.max_steps={args.steps}",
                f"train.seeds={list(range(args.seeds))}",
            )  # fmt: skip
        results[name] = json.loads((run / "seeds.json").read_text())["metrics"]

    dim = {name: json.loads((f / "manifest.json").read_text())["image_shape"][0] for name, f in embeddings.items()}
    print(f"data: {data}, probes trained on train and tested on valid; load average {os.getloadavg()[0]:.1f}")
    print(
        f"compact_cnn trained {args.budget} (step {best['step']}, best of {len(valid)} validations): valid "
        f"balanced accuracy {best['balanced_accuracy']:.4f}, AUROC {best['auroc']:.4f} (its own head, threshold 0.5)"
    )
    print("| features | D | probe balanced accuracy (valid) | probe AUROC (valid) | seeds |")
    print("|---|---|---|---|---|")
    for name, m in results.items():
        b, a = m["balanced_accuracy"], m["auroc"]
        print(
            f"| compact_cnn, {name} | {dim[name]} | {b['mean']:.4f} ± {b['std']:.4f} | {a['mean']:.4f} ± "
            f"{a['std']:.4f} | {len(b['values'])} |"
        )
    for step, seconds in times.items():
        print(f"  {step}: {seconds:.0f} s")


if __name__ == "__main__":
    main()
