"""The run directory: where a training run keeps what it did, and how it was made.

    RUN/config.yaml        the resolved config (every default filled in)
    RUN/provenance.json    code (git commit, dirty flag), package versions, host, devices, data identity
    RUN/metrics.jsonl      one JSON record per log, validation and test (tracking.RunLog)
    RUN/checkpoints/       step-*.pt (+ .sha256) and best.pt (checkpoint.Checkpointer)
    RUN/test/              the best checkpoint's test evaluation: metrics.json, predictions.csv, plots
    RUN/wandb/             the W&B run, when tracking.wandb is on

Only the main process writes here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from histo_dist.config import dump_yaml
from histo_dist.files import sha256_file, write_atomic
from histo_dist.manifest import Manifest


def default_run_dir(config_path: str | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def provenance(*, world_size: int, device_type: str, mixed_precision: str, manifest: Manifest) -> dict[str, Any]:
    """Code, versions, hardware and data identity of a run."""
    import importlib.metadata
    import platform
    import socket
    import subprocess
    import sys

    import torch

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
            return out.stdout.strip() if out.returncode == 0 else None
        except OSError:
            return None

    packages = {}
    for name in (
        "histo-dist",
        "torch",
        "torchvision",
        "timm",
        "accelerate",
        "webdataset",
        "torchmetrics",
        "wandb",
        "numpy",
        "h5py",
    ):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    status = git("status", "--porcelain")
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device_type == "cuda"
        else [platform.processor() or platform.machine()]
    )
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "command": sys.argv,
        "python": sys.version.split()[0],
        "packages": packages,
        "host": socket.gethostname(),
        "world_size": world_size,
        "device_type": device_type,
        "devices": devices,
        "mixed_precision": mixed_precision,
        "manifest": str(manifest.root / "manifest.json"),
        "manifest_sha256": sha256_file(manifest.root / "manifest.json"),
    }


def write_run_files(run_dir: Path, cfg: Any, provenance_record: dict[str, Any]) -> None:
    """config.yaml and provenance.json (main process only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    write_atomic(run_dir / "provenance.json", json.dumps(provenance_record, indent=2) + "\n")
