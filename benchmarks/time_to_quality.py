"""Time to quality: the model a user gets in a fixed wall-clock budget, our recipe against the seed's workflow.

    python benchmarks/time_to_quality.py                       # 300 s each, seed 0, shared real PCam
    python benchmarks/time_to_quality.py --seeds 0,1,2 --curve 60,300,900,1800 --out ttq.json
    python benchmarks/time_to_quality.py --baseline-seeds "" --seeds 0,1,2 --config A.yaml --config B.yaml

Both sides get the same data, the same budget for their whole command (process start to exit, imports
included) and the same CPU threads:

- the seed's workflow, written plainly as its notebook did: a map-style torchvision ImageFolder over
  the JPEG files, RandomHorizontalFlip / RandomRotation(20) / ColorJitter, the seed's CNN (4 conv
  blocks + FC 256 + dropout), BCEWithLogits, Adam 1e-3, batch 64, fp32; it trains epochs until the
  budget, less the time its evaluation needs, is spent, then calls p >= 0.5 tumor;
- ours: `histo-dist train --config configs/pcam_fast_cpu.yaml train.time_budget=<budget>` on shards
  converted once beforehand (conversion is not in the budget: it is done once per dataset), with its
  threshold chosen on the validation split.

Data: --data is an ImageFolder tree with train/ and valid/ (and test/ if it has one); --test adds the
test split of a PCam HDF5 folder (default ../shared/data/pcam-real-2k) when --data has none. Prints
test AUROC, accuracy, images/s and epochs of both, the difference, and with --curve our recipe's
AUROC against budgets. Figures go in docs/benchmarks.md.

With --config given more than once, the configs run interleaved, seed by seed (A, B, A, B, ...), so that a
slower stretch of the machine falls on both alike; each gets its row, and every config after the first its
difference to the first, seed by seed, in best validation AUROC: the figure a recipe change is kept by.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


# ---------------------------------------------------------------------------------------------
# The seed's workflow, as its notebook wrote it (run in its own process, timed as a whole)


def seed_workflow(data: Path, budget: float, seed: int, out: Path) -> None:
    from histo_dist.budget import process_age

    started = time.monotonic() - process_age()  # the process's start: its imports are in the budget too
    import numpy as np
    import torch
    from PIL import Image
    from torch import nn
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    normalize = transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    train_tf = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(20),
            transforms.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.05),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_tf = transforms.Compose([transforms.ToTensor(), normalize])
    loader = lambda p: Image.open(p).convert("RGB")  # noqa: E731 - as the notebook wrote it
    train_set = datasets.ImageFolder(data / "train", train_tf, loader=loader)
    test_set = datasets.ImageFolder(data / "test", eval_tf, loader=loader)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True, num_workers=2)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, num_workers=2)

    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(
        block(3, 32),
        block(32, 64),
        block(64, 128),
        block(128, 128),
        nn.Flatten(),
        nn.Linear(128 * 6 * 6, 256),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(256, 1),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.BCEWithLogitsLoss()

    def evaluate() -> tuple[np.ndarray, np.ndarray]:
        model.eval()
        probs, labels = [], []
        with torch.no_grad():
            for x, y in test_loader:
                probs.append(torch.sigmoid(model(x).squeeze(1)))
                labels.append(y)
        model.train()
        return torch.cat(probs).numpy(), torch.cat(labels).numpy()

    # The evaluation's cost, measured once up front, is kept back from the training time.
    t = time.monotonic()
    evaluate()
    eval_s = time.monotonic() - t
    deadline = started + budget - eval_s - 3.0  # and 3 s for the exit
    images, epochs, train_s = 0, 0.0, 0.0
    t = time.monotonic()
    while time.monotonic() < deadline:
        for i, (x, y) in enumerate(train_loader):
            loss = loss_fn(model(x).squeeze(1), y.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += len(y)
            if time.monotonic() >= deadline:
                epochs += (i + 1) / len(train_loader)
                break
        else:
            epochs += 1
    train_s = time.monotonic() - t
    probs, labels = evaluate()
    from torchmetrics.functional.classification import binary_auroc

    auroc = binary_auroc(torch.from_numpy(probs), torch.from_numpy(labels))
    out.write_text(
        json.dumps(
            {
                "auroc": float(auroc),
                "accuracy": float(((probs >= 0.5) == labels).mean()),
                "threshold": 0.5,
                "images_per_s": images / train_s,
                "epochs": epochs,
                "train_images": images,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# Data: one ImageFolder tree with train/valid/test, converted once to shards for our side


def prepare(data: Path, test: Path | None, work: Path) -> tuple[Path, Path]:
    """(ImageFolder tree with test/, shard folder) under `work`; made once and reused."""
    tree, shards = work / "imagefolder", work / "shards"
    if not (tree / "test").exists():
        for split in ("train", "valid", "test"):
            if (data / split).is_dir():
                (tree / split).mkdir(parents=True, exist_ok=True)
                for cls in sorted(p for p in (data / split).iterdir() if p.is_dir()):
                    (tree / split / cls.name).symlink_to(cls.resolve(), target_is_directory=True)
        if not (data / "test").is_dir():
            if test is None:
                raise SystemExit(f"{data} has no test/ split: give --test (a PCam HDF5 folder)")
            import h5py
            import numpy as np
            from PIL import Image

            with (
                h5py.File(test / "camelyonpatch_level_2_split_test_x.h5") as fx,
                h5py.File(test / "camelyonpatch_level_2_split_test_y.h5") as fy,
            ):
                x, y = fx["x"][:], np.asarray(fy["y"][:]).reshape(-1)
            for i, (image, label) in enumerate(zip(x, y)):  # PNG: the decoded pixels, exactly
                folder = tree / "test" / str(int(label))
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(folder / f"test_{i:06d}.png")
    if not (shards / "manifest.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "histo_dist",
                "convert",
                "--input",
                str(tree),
                "--format",
                "imagefolder",
                "--output",
                str(shards),
                "--overwrite",
                "--no-progress",
            ],
            check=True,
            cwd=ROOT,
        )
    return tree, shards


# ---------------------------------------------------------------------------------------------
# Runs


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-4000:]}")
    return time.monotonic() - t


def run_seed(tree: Path, budget: float, seed: int, work: Path, env: dict[str, str]) -> dict:
    out = work / f"seed-workflow-{budget:.0f}s-seed{seed}.json"
    wall = timed(
        [
            sys.executable,
            __file__,
            "--seed-workflow",
            str(tree),
            "--budget",
            str(budget),
            "--seeds",
            str(seed),
            "--out",
            str(out),
        ],
        env,
    )
    return {**json.loads(out.read_text()), "wall_s": wall}


def run_ours(
    shards: Path, budget: float, seed: int, work: Path, env: dict[str, str], config: str, name: str = "ours"
) -> dict:
    run_dir = work / f"{name}-{budget:.0f}s-seed{seed}"
    wall = timed(
        [
            sys.executable,
            "-m",
            "histo_dist",
            "train",
            "--config",
            config,
            "--run-dir",
            str(run_dir),
            f"data.shards={shards}",
            f"train.time_budget={budget:.0f}s",
            f"train.seed={seed}",
            "--fresh",  # a rerun starts over: an earlier run there is moved aside
            "tracking.progress=false",
            "tracking.wandb=false",
        ],
        env,
    )
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((run_dir / "plan.json").read_text())
    train_size = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    from histo_dist.experiment import load_experiment

    batch = load_experiment(run_dir / "config.yaml").loader.batch_size
    speeds = [r["images_per_s"] for r in records if r["kind"] == "train"][1:]  # the first includes start-up
    valid = [r["auroc"] for r in records if r["kind"] == "valid"]
    best = metrics.get("tta", metrics)
    return {
        "auroc": metrics["auroc"],
        "accuracy": metrics["accuracy"],
        "threshold": metrics["threshold"],
        "auroc_reported": best["auroc"],
        "accuracy_reported": best["accuracy"],
        "tta": "tta" in metrics,
        "images_per_s": statistics.median(speeds) if speeds else float("nan"),
        "epochs": plan["total_steps"] * batch / train_size,
        "train_images": plan["total_steps"] * batch,
        "best_valid_auroc": max(valid) if valid else float("nan"),
        "wall_s": wall,
        "run_dir": str(run_dir),
        "config": config,
        "seed": seed,
    }


def summary(rows: list[dict], key: str, digits: int = 3) -> str:
    values = [r[key] for r in rows]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(name: str, rows: list[dict], auroc: str, accuracy: str) -> str:
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    valid = summary(rows, "best_valid_auroc", 4) if "best_valid_auroc" in rows[0] else "-"
    return (
        f"| {name} | {mean('wall_s'):.0f} s | {mean('images_per_s'):.0f} | {mean('epochs'):.1f} | "
        f"{valid} | {summary(rows, auroc)} | {summary(rows, accuracy)} |"
    )


def paired_difference(rows: list[dict], base: list[dict]) -> str:
    """Best validation AUROC of `rows` less `base`'s, seed by seed (both in seed order)."""
    diffs = [r["best_valid_auroc"] - b["best_valid_auroc"] for r, b in zip(rows, base)]
    higher = sum(d > 0 for d in diffs)
    return (
        f"best valid AUROC {' / '.join(f'{d:+.4f}' for d in diffs)} (seeds {', '.join(str(r['seed']) for r in rows)}; "
        f"mean {statistics.mean(diffs):+.4f}, higher on {higher} of {len(diffs)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=SHARED / "pcam-real-20k", help="ImageFolder root: train/, valid/[, test/]"
    )
    parser.add_argument(
        "--test", type=Path, default=SHARED / "pcam-real-2k", help="PCam HDF5 folder for the test split"
    )
    parser.add_argument("--budget", type=float, default=300, help="seconds per command (default 300)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds of our recipe (mean and spread)")
    parser.add_argument(
        "--baseline-seeds", default="0", help="seeds of the seed's workflow ('' skips it: e.g. a curve point alone)"
    )
    parser.add_argument("--curve", default="", help="comma-separated budgets (s) for our recipe's AUROC curve")
    parser.add_argument(
        "--config",
        action="append",
        help="our recipe's config (default configs/pcam_fast_cpu.yaml); give it again to compare configs, "
        "interleaved seed by seed (the curve takes the first)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/histo-dist-ttq"))
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--seed-workflow", type=Path, help=argparse.SUPPRESS)  # the baseline's own process
    args = parser.parse_args()
    if args.seed_workflow:
        return seed_workflow(args.seed_workflow, args.budget, int(args.seeds), args.out)

    from histo_dist.config import ConfigError
    from histo_dist.experiment import load_experiment

    # Absolute paths: the runs' working directory is ROOT, not ours.
    configs = [str(Path(c).resolve()) for c in args.config or [ROOT / "configs" / "pcam_fast_cpu.yaml"]]
    names = ["ours"] if len(configs) == 1 else [Path(c).stem for c in configs]
    if len(set(names)) != len(names):
        parser.error(f"--config: the run directories are named by file name, and these repeat one: {configs}")
    for config in configs:  # a missing or invalid config fails now, not after the runs before it
        try:
            load_experiment(config)
        except ConfigError as e:
            parser.error(str(e))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    args.work.mkdir(parents=True, exist_ok=True)
    tree, shards = prepare(args.data, args.test if args.test and args.test.exists() else None, args.work)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {"budget_s": args.budget, "threads": args.threads, "load_before": os.getloadavg()}
    print(f"time to quality: {args.budget:.0f} s per command, {args.threads} threads, data {args.data}")
    baseline_seeds = [int(s) for s in args.baseline_seeds.split(",") if s]
    results["seed_workflow"] = [run_seed(tree, args.budget, s, args.work, env) for s in baseline_seeds]
    runs = [run_ours(shards, args.budget, s, args.work, env, c, n) for s in seeds for c, n in zip(configs, names)]
    by_config = {c: [r for r in runs if r["config"] == c] for c in configs}
    results["ours"] = runs
    ours, theirs = by_config[configs[0]], results["seed_workflow"]
    lines = [
        "| what | wall | images/s | epochs | best valid AUROC | test AUROC | test accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    if theirs:
        lines.append(table("seed's workflow (p >= 0.5)", theirs, "auroc", "accuracy"))
    for config, rows in by_config.items():
        lines.append(table(f"histo-dist, {config}", rows, "auroc_reported", "accuracy_reported"))
    print("\n".join(lines))
    for config, rows in list(by_config.items())[1:]:
        print(f"{config} against {configs[0]}: {paired_difference(rows, ours)}")
    if theirs:
        gain = statistics.mean(r["auroc_reported"] for r in ours) - statistics.mean(r["auroc"] for r in theirs)
        speed = statistics.mean(r["images_per_s"] for r in ours) / statistics.mean(r["images_per_s"] for r in theirs)
        print(
            f"difference: test AUROC {gain:+.3f}, {speed:.1f}x the images per second"
            + ("; ours with TTA x8 and the threshold chosen on valid" if ours[0]["tta"] else "")
        )
    if args.curve:
        results["curve"] = []
        print("\n| budget | test AUROC | test accuracy | epochs |\n|---|---|---|---|")
        for b in (float(v) for v in args.curve.split(",")):
            row = next((r for r in ours if b == args.budget), None) or run_ours(
                shards, b, seeds[0], args.work, env, configs[0]
            )
            results["curve"].append({"budget_s": b, **row})
            auroc, accuracy = row["auroc_reported"], row["accuracy_reported"]
            print(f"| {b / 60:g} min | {auroc:.3f} | {accuracy:.3f} | {row['epochs']:.1f} |")
    results["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
