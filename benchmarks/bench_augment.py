"""Cost of augmentation per image, in a loader worker (CPU, 1 thread) and batched on a device.

    .venv/bin/python benchmarks/bench_augment.py --batch 256 --iters 20

Columns: "worker" is one CPU thread (what each DataLoader worker gets), "cpu" all CPU threads,
"cuda" the first GPU when there is one: wall-clock microseconds per image, median over iterations.
"worker cpu" is the process CPU time of the worker case: on a machine shared with other jobs it
stays close to the uncontended figure while wall time grows.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch

from histo_dist.augment import AugmentConfig, augment, eval_transform

DEFAULTS = AugmentConfig()
CASES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "eval_transform": lambda x, s: eval_transform(x, DEFAULTS),
    "augment, defaults": lambda x, s: augment(x, s, DEFAULTS),
    "augment, + rotate 15": lambda x, s: augment(x, s, dataclasses.replace(DEFAULTS, rotate_degrees=15.0)),
    "augment, dihedral only": lambda x, s: augment(
        x, s, AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, stain_sigma=0, stain_bias=0)
    ),
}


def us_per_image(fn: Callable, x: torch.Tensor, s: torch.Tensor, iters: int) -> tuple[float, float]:
    """(wall, process CPU time) per image in microseconds, medians over `iters` calls."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(2):  # warm-up: allocator, caches, CUDA kernels
        fn(x, s)
    wall, cpu = [], []
    for _ in range(iters):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn(x, s)
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) / x.shape[0] * 1e6, statistics.median(cpu) / x.shape[0] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--size", type=int, default=96, help="patch side in pixels")
    args = parser.parse_args()

    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8)
    s = torch.arange(args.batch, dtype=torch.int64)
    all_threads = torch.get_num_threads()
    settings = {"worker": ("cpu", 1), "cpu": ("cpu", all_threads)}
    if torch.cuda.is_available():
        settings["cuda"] = ("cuda", all_threads)

    print(f"batch {args.batch}, {args.size}x{args.size}, {args.iters} iters, us/image; cpu = {all_threads} threads")
    print(f"{'':24}{'worker cpu':>12}" + "".join(f"{name:>10}" for name in settings))
    for case, fn in CASES.items():
        row = []
        for name, (device, threads) in settings.items():
            torch.set_num_threads(threads)
            wall, cpu = us_per_image(fn, x.to(device), s.to(device), args.iters)
            row += [cpu, wall] if name == "worker" else [wall]
        print(f"{case:24}{row[0]:12.1f}" + "".join(f"{v:10.1f}" for v in row[1:]))
    torch.set_num_threads(all_threads)


if __name__ == "__main__":
    main()
