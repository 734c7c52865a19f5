"""W&B through RunLog: a dead W&B service (a preemption's SIGTERM kills it, wandb #9963) must not stop the run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.runs import ENV, ROOT

# In a process of its own: a real offline W&B run, its service killed, then what a preempted run does next.
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path

    from accelerate import Accelerator
    from wandb.sdk.lib import telemetry

    from histo_dist.tracking import RunLog, TrackingConfig

    def descendants(pid):
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(p) == pid]
        return children + [d for c in children for d in descendants(c)]

    def _parent(pid):
        try:
            return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return None

    run_dir = Path(sys.argv[1])
    run_log = RunLog(Accelerator(cpu=True, log_with="wandb"), run_dir, TrackingConfig(wandb=True, mode="offline"), {})
    # A library W&B watches for and this process has not loaded yet (timm is a dependency; torchmetrics loads
    # torchvision this way at a run's first validation).
    module = "timm"
    assert module in telemetry.list_telemetry_imports() and module not in sys.modules
    service = [p for p in descendants(os.getpid()) if b"wandb" in open(f"/proc/{p}/cmdline", "rb").read()]
    assert service, "no W&B service process found"
    for pid in service:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split(") ")[1][0] != "Z"
              for p in service):
        assert time.monotonic() < deadline, "the W&B service did not stop"
        time.sleep(0.05)
    time.sleep(0.5)
    __import__(module)
    print("imported", module, flush=True)
    run_log.log({"loss": 0.5}, step=7, kind="train")
    print("logged", flush=True)
    """
)


def test_a_dead_wandb_service_breaks_neither_a_first_import_nor_logging(tmp_path):
    script = tmp_path / "dead_service.py"
    script.write_text(SCRIPT)
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    assert "imported" in out.stdout and "logged" in out.stdout, out.stdout + out.stderr[-4000:]
    assert "W&B logging failed (ConnectionResetError" in out.stderr  # the log call met the dead service, guarded
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "train" and record["step"] == 7 and record["loss"] == 0.5
