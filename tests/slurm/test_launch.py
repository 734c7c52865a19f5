"""launch/train.sh picks the launcher and its arguments from the environment (checked with
HISTO_DIST_DRY_RUN=1, which prints the command), the accelerate configs load, the sbatch scripts
carry the #SBATCH settings preemption depends on, and `histo-dist convert --part` (the array job's
unit) gives the same bytes as one conversion. Fast; no SLURM, no training.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "train.sh"
CLEAN = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "HISTO_DIST_", "CUDA_VISIBLE_DEVICES", "PET_", "TORCHELASTIC_", "ACCELERATE_"))
}


def dry_run(env: dict[str, str], *args: str) -> tuple[list[str], str]:
    """The command launch/train.sh would run, as a list, and its stderr."""
    # No GPUs unless the case sets CUDA_VISIBLE_DEVICES (so the result does not depend on this machine).
    full = {**CLEAN, "CUDA_VISIBLE_DEVICES": "", "PYTHON": "python3", "HISTO_DIST_DRY_RUN": "1", **env}
    out = subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True, env=full, timeout=30)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout), out.stderr


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_one_process_runs_histo_dist_directly_so_exit_75_reaches_slurm():
    cmd, _ = dry_run({}, "--config", "configs/cpu_test.yaml", "optim.lr=0.1")
    assert cmd == ["python3", "-m", "histo_dist", "train", "--config", "configs/cpu_test.yaml", "optim.lr=0.1"]
    cmd, _ = dry_run({"CUDA_VISIBLE_DEVICES": "3"}, "x=1")  # one GPU: no launcher either
    assert cmd[1:4] == ["-m", "histo_dist", "train"]


def test_cpu_ranks_use_gloo_config_and_a_free_port():
    cmd, err = dry_run({"HISTO_DIST_CPU": "1", "HISTO_DIST_NPROC": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "a=b")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert option(cmd, "--config_file").endswith("launch/accelerate/cpu_multi.yaml")
    assert (option(cmd, "--num_processes"), option(cmd, "--num_machines"), option(cmd, "--main_process_port")) == (
        "2",
        "1",
        "0",
    )
    assert cmd[-4:] == ["-m", "histo_dist", "train", "a=b"]
    assert "cpu, 2 process(es) x 1 machine(s)" in err


@pytest.mark.parametrize(
    "env, gpus",
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "4"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"}, "2"),  # UUIDs, as SLURM may set them
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3", "HISTO_DIST_NPROC": "2"}, "2"),
    ],
)
def test_one_node_uses_one_process_per_visible_gpu(env, gpus):
    cmd, _ = dry_run(env)
    assert option(cmd, "--config_file").endswith("launch/accelerate/gpu_1node.yaml")
    assert option(cmd, "--num_processes") == gpus and option(cmd, "--num_machines") == "1"


def test_srun_step_over_nodes_reads_node_rank_and_head_on_each_node():
    step = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_NNODES": "3",
        "SLURM_NODEID": "2",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "HISTO_DIST_HEAD": "10.0.0.7",
    }
    cmd, _ = dry_run(step, "--run-dir", "runs/x")
    assert option(cmd, "--config_file").endswith("launch/accelerate/multinode.yaml")
    assert option(cmd, "--num_machines") == "3"
    assert option(cmd, "--num_processes") == "6"  # accelerate counts processes over all machines
    assert option(cmd, "--machine_rank") == "2"
    assert option(cmd, "--main_process_ip") == "10.0.0.7"
    assert option(cmd, "--main_process_port") == str(20000 + 4242 % 10000)  # the same on every node


def test_a_multi_node_allocation_outside_srun_trains_on_this_node_and_says_so():
    cmd, err = dry_run({"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert option(cmd, "--num_machines") == "1"
    assert "not in an srun step" in err


def test_launcher_makes_torchrun_forward_sigusr1_and_wait_for_the_checkpoint():
    text = LAUNCH.read_text()
    assert re.search(r"PET_SIGNALS_TO_HANDLE=.*SIGUSR1", text)  # read by accelerate's torchrun parser
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in text


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((ROOT / "launch" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"cpu_single", "cpu_multi", "gpu_1node", "multinode"}
    for path in configs:
        cfg = load_config_from_file(str(path))
        assert cfg.num_processes >= 1, path


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in (ROOT / "slurm" / script).read_text().splitlines():
        if m := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            options[m[1]] = m[2] or ""
    return options


@pytest.mark.parametrize("script", ["train.sbatch", "train_multinode.sbatch"])
def test_training_scripts_ask_for_a_warning_signal_requeue_and_append(script):
    options = sbatch_options(script)
    assert re.fullmatch(r"B:USR1@\d+", options["signal"])
    assert "requeue" in options and options["open-mode"] == "append"
    assert options["ntasks-per-node"] == "1"


def test_sbatch_scripts_parse():
    for path in (ROOT / "slurm").glob("*"):
        if path.suffix in (".sbatch", ".sh"):
            out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
            assert out.returncode == 0, f"{path}: {out.stderr}"


# ---------------------------------------------------------------------------------------------
# convert --part: the unit of slurm/convert.sbatch


def test_parts_written_at_once_then_the_manifest_equal_one_conversion(tmp_path):
    from tests.source_data import tree_hashes, write_pcam

    source = tmp_path / "pcam"
    write_pcam(source, {"train": 90, "valid": 30, "test": 30}, gz=True)
    exe = [
        sys.executable,
        "-m",
        "histo_dist",
        "convert",
        "--input",
        str(source),
        "--no-progress",
        "--workers",
        "1",
        "--samples-per-shard",
        "16",
    ]
    parts = tmp_path / "parts"
    procs = [
        subprocess.Popen(
            [*exe, "--output", str(parts), "--part", f"{i}/3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "run the same command without --part" in out
    assert not (parts / "manifest.json").exists()
    assert len(list(parts.glob("*.tar"))) == 6 + 2 + 2
    final = subprocess.run([*exe, "--output", str(parts)], capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    single = subprocess.run([*exe, "--output", str(tmp_path / "single")], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    assert tree_hashes(parts) == tree_hashes(tmp_path / "single")
    assert sorted(p.name for p in parts.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())


@pytest.mark.parametrize(
    "part, problem",
    [
        ("3/3", "must be 'i/n'"),
        ("1", "must be 'i/n'"),
        ("-1/2", "must be 'i/n'"),
        ("0/2 --overwrite", "overwrite"),
    ],
)
def test_bad_parts_are_refused_before_anything_is_written(tmp_path, part, problem):
    value, *extra = part.split()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "histo_dist",
            "convert",
            "--input",
            str(tmp_path),
            "--output",
            str(tmp_path / "out"),
            f"--part={value}",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and problem in out.stderr, out.stderr
    assert not (tmp_path / "out").exists()
