"""What a short command costs besides its work: the exit, and the launcher's start.

    python benchmarks/bench_startup.py [--repeats 5] [--steps 2]

One small training run (`configs/cpu_test.yaml` on synthetic 32 px shards written here, `--steps` optimizer
steps, one validation) is started four ways, alternating so that machine noise hits each the same:

- `main()` then a normal `sys.exit`: the interpreter tears its modules down (torch, torch._dynamo, torchmetrics)
  before the process ends. This is how `histo-dist` ended before `histo_dist.cli.exit_without_teardown`.
- `python -m histo_dist train` (and the `histo-dist` command): exit handlers, then the process ends.
- `accelerate launch --multi_gpu --num_processes 2 -m histo_dist train` (two gloo ranks): the `accelerate`
  command imports every one of its subcommands first, timm among them.
- `python -m accelerate.commands.launch` with the same arguments, as launch/train.sh starts it.

Prints the median wall time of each and the differences.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each way (median reported)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of each run")
    args = parser.parse_args()

    from tests.shard_data import make_dataset

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "WANDB_MODE": "disabled"}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        make_dataset(shards, {"train": [128], "valid": [64]}, shape=(32, 32, 3), learnable=True)
        run_dir = Path(tmp) / "run"
        train = ["train", "--config", str(ROOT / "configs/cpu_test.yaml"), "--run-dir", str(run_dir)]
        train += [f"data.shards={shards}", "data.test_split=", f"train.max_steps={args.steps}", "loader.batch_size=16"]
        train += ["schedule.warmup_steps=0", "tracking.progress=false", "tracking.wandb=false"]
        two_ranks = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0", "-m", "histo_dist", *train]
        ways = {
            "main() + sys.exit (teardown)": [
                sys.executable,
                "-c",
                "import sys; from histo_dist.cli import main; sys.exit(main())",
            ],
            "python -m histo_dist": [sys.executable, "-m", "histo_dist"],
            "accelerate launch, 2 ranks": [str(bin_dir / "accelerate"), "launch"],
            "python -m accelerate.commands.launch, 2 ranks": [sys.executable, "-m", "accelerate.commands.launch"],
        }
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for repeat in range(args.repeats):
            for name, start in ways.items():
                cmd = [*start, *(two_ranks if "launch" in name else train)]
                shutil.rmtree(run_dir, ignore_errors=True)
                t0 = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                seconds[name].append(time.perf_counter() - t0)
                if out.returncode != 0:
                    sys.exit(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{s[-1]:.2f}" for s in seconds.values()))

    median = {name: statistics.median(s) for name, s in seconds.items()}
    print(f"\nmedian wall time of {args.repeats} runs, {args.steps} steps each, {os.cpu_count()} CPUs:")
    for name, value in median.items():
        print(f"  {name:48s} {value:6.2f} s")
    names = list(median)
    for before, after in ((names[0], names[1]), (names[2], names[3])):
        saved = median[before] - median[after]
        print(f"  {after} saves {saved:.2f} s ({saved / median[before]:.0%}) against {before}")


if __name__ == "__main__":
    main()
