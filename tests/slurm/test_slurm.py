"""The SLURM path on a real SLURM: slurmctld, two slurmd (nodes n1, n2 on 127.0.0.1) and munged
from the distribution's packages, started here, all state in a temporary folder.

The scripts under slurm/ are submitted as they are; only partition, resources and the CPU test
mode come from the sbatch command line (`--export=ALL,CONFIG=...,HISTO_DIST_CPU=1,...`):

- train.sbatch, 2 CPU ranks, W&B offline: completes; metrics, checkpoints, W&B run in the run dir.
- the same job preempted twice, by a higher-priority partition (SIGTERM to the steps, grace time)
  and by the time-limit warning (SIGUSR1 to the batch shell, as `--signal=B:USR1@300` sends it):
  each time it checkpoints, requeues itself, resumes, and ends bitwise equal to the first job.
- train_multinode.sbatch over two nodes (one rank each): the same weights again.
- convert.sbatch as a 3-task array: each task writes its part, the dependent job writes the
  manifest; the shards are byte-identical to a one-process conversion and verify.

Skips with the reason where the daemons cannot run (not root and not installed, no apt-get).
Select with `-m slurm`, leave out with `-m "not slurm"`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.runs import BIN, ROOT, assert_same_weights, final_state, logged_step, make_train_shards, records, results_of
from tests.slurm.cluster import Cluster, ClusterUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

JOB_ENV = {  # (PYTHONPATH: the checkout under test, even where the venv's editable install points elsewhere)
    "OMP_NUM_THREADS": "1",
    "WANDB_SILENT": "true",
    "VENV": str(Path(sys.executable).parents[1]),
    "PYTHONPATH": str(ROOT),
}

# The same small, deterministic run for every training job (3 epochs x 15 steps of 2 x 8 samples).
OVERRIDES = [
    "loader.batch_size=8",
    "loader.eval_batch_size=32",
    "loader.num_workers=1",
    "loader.shuffle_buffer=64",
    "train.epochs=3",
    "train.deterministic=true",
    "tracking.progress=false",
    "tracking.log_every_steps=1",
    "schedule.warmup_steps=3",
]
TOTAL_STEPS = 45


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    c = Cluster(root, nodes=2)
    try:
        c.start()
    except ClusterUnavailable as e:
        pytest.skip(f"no SLURM here: {e}")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_train_shards(tmp_path_factory.mktemp("slurm-shards"))


def submit_training(
    cluster: Cluster, script: str, submit_dir: Path, shards: Path, resources: list[str], nproc: int, *overrides: str
) -> int:
    """sbatch the script from the checkout as it is: partition, resources and CPU mode from the command line."""
    submit_dir.mkdir(parents=True, exist_ok=True)
    export = f"ALL,CONFIG=configs/cpu_test.yaml,DATA={shards},HISTO_DIST_CPU=1,HISTO_DIST_NPROC={nproc}"
    return cluster.sbatch(
        [
            "--partition=debug",
            "--gpus-per-node=0",
            "--mem=0",
            "--time=15",
            *resources,
            f"--export={export}",
            ROOT / "slurm" / script,
            *OVERRIDES,
            *overrides,
        ],
        cwd=submit_dir,
        env=JOB_ENV,
    )


def job_log(submit_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(submit_dir.glob("*.out")))


def run_dir_of(submit_dir: Path, job_id: int, name: str = "histo-dist") -> Path:
    return submit_dir / "runs" / f"{name}-{job_id}"  # the default RUN_DIR: stable across requeues


def assert_completed(cluster: Cluster, job_id: int, submit_dir: Path, timeout: float = 240) -> dict:
    info = cluster.wait_for(job_id, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{job_log(submit_dir)[-6000:]}"
    return info


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = final_state(run_dir)
    assert state["step"] == TOTAL_STEPS, run_dir
    return state["model"]


def wait_until(
    predicate,
    what: str,
    timeout: float = 120,
    poll: float = 0.2,
    cluster: Cluster | None = None,
    job: int | None = None,
    submit_dir: Path | None = None,
) -> None:
    """Poll; with a job, fail at once (showing its log) when it ends before `predicate` holds."""
    deadline = time.time() + timeout
    while not predicate():
        ended = job is not None and cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
        tail = job_log(submit_dir)[-4000:] if submit_dir else ""
        assert not ended, f"job {job} ended before {what}:\n{tail}"
        assert time.time() < deadline, f"timed out waiting for {what}:\n{tail}"
        time.sleep(poll)


def errors_in(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if re.search(r"Error|error:|Traceback|killed", line))[-3000:]


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(cluster, shards, tmp_path_factory) -> tuple[int, Path, Path]:
    """train.sbatch, 2 CPU ranks on one node, W&B offline; uninterrupted."""
    submit_dir = tmp_path_factory.mktemp("submit-reference")
    job = submit_training(
        cluster, "train.sbatch", submit_dir, shards, ["--nodes=1", "--cpus-per-task=2"], 2, "tracking.wandb=true"
    )
    assert_completed(cluster, job, submit_dir)
    return job, submit_dir, run_dir_of(submit_dir, job)


def test_train_sbatch_completes_with_metrics_and_an_offline_wandb_run(reference):
    job, submit_dir, run = reference
    for name in ("config.yaml", "provenance.json", "metrics.jsonl", "test/metrics.json", "checkpoints/best.pt"):
        assert (run / name).exists(), name
    assert json.loads((run / "provenance.json").read_text())["world_size"] == 2
    assert [r["step"] for r in records(run, "valid")] == [15, 30, 45]
    assert results_of(run)["num_samples"] == 64
    assert (submit_dir / f"histo-dist-{job}.out").exists()  # #SBATCH --output=%x-%j.out
    assert "launch/train.sh: cpu, 2 process(es) x 1 machine(s)" in job_log(submit_dir)

    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    out = subprocess.run(
        [str(BIN / "wandb"), "leet", "inspect", "--summary", "--json", str(offline[0])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)["summary"]
    last_train = records(run, "train")[-1]
    assert summary["train/loss"] == pytest.approx(last_train["loss"])
    assert summary["test/auroc"] == pytest.approx(results_of(run)["auroc"])


def test_preempted_twice_checkpoints_requeues_resumes_and_ends_bitwise_equal(cluster, shards, reference, tmp_path):
    submit_dir = tmp_path / "submit"
    # W&B on (offline): its service dies with the step's SIGTERM (wandb #9963). Its import hooks then raised
    # from the first validation's imports before the checkpoint (4 runs of 7, before tracking.py removed them).
    job = submit_training(
        cluster, "train.sbatch", submit_dir, shards, ["--nodes=1", "--cpus-per-task=2"], 2, "tracking.wandb=true"
    )
    run = run_dir_of(submit_dir, job)

    # 1. A job in a higher-priority partition needs the node: SLURM preempts ours (PreemptMode=REQUEUE,
    #    GraceTime: SIGTERM to the steps). It checkpoints, exits 75, and the batch script requeues it.
    watch = dict(cluster=cluster, job=job, submit_dir=submit_dir)
    wait_until(lambda: logged_step(run) >= 3, "the first steps", **watch)
    node = cluster.job(job)["NodeList"]
    urgent = cluster.sbatch(
        [
            "--partition=urgent",
            f"--nodelist={node}",
            "--cpus-per-task=2",
            "--mem=0",
            f"--output={tmp_path}/urgent.out",
            "--wrap",
            "sleep 1",
        ],
        cwd=tmp_path,
    )
    wait_until(lambda: int(cluster.job(job).get("Restarts", 0)) >= 1, "the requeue after preemption", **watch)
    log = job_log(submit_dir)
    assert "preempted (SIGTERM): checkpoint at step" in log, (
        f"no checkpoint on SIGTERM from the preemption (SLURM signals every process of the step, loader "
        f"workers included):\n{errors_in(log)}"
    )
    assert cluster.wait_for(urgent, timeout=120)["JobState"] == "COMPLETED"

    # 2. The requeued job resumes; then the time-limit warning: SIGUSR1 to the batch shell (what
    #    `#SBATCH --signal=B:USR1@300` sends), which forwards it to the steps; checkpoint, 75, requeue.
    wait_until(lambda: "resumed from" in job_log(submit_dir), "the resumed run", timeout=180, **watch)
    resumed_at = int(re.findall(r"resumed from \S+ at step (\d+)", job_log(submit_dir))[0])
    wait_until(lambda: logged_step(run) >= resumed_at + 2, "steps after the resume", **watch)
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    wait_until(lambda: int(cluster.job(job).get("Restarts", 0)) >= 2, "the requeue after SIGUSR1", **watch)

    info = assert_completed(cluster, job, submit_dir)
    log = job_log(submit_dir)
    assert int(info["Restarts"]) == 2
    preempted = [
        (sig, int(step))
        for sig, step in re.findall(
            r"rank 0/2\] WARNING histo_dist.train: preempted \((\w+)\): "
            r"checkpoint at step (\d+)",
            log,
        )
    ]
    resumed = [int(s) for s in re.findall(r"rank 0/2\] INFO histo_dist.train: resumed from \S+ at step (\d+)", log)]
    assert [sig for sig, _ in preempted] == ["SIGTERM", "SIGUSR1"], log[-6000:]
    assert [step for _, step in preempted] == resumed, (preempted, resumed)
    assert 3 <= resumed[0] < resumed[1] < TOTAL_STEPS
    assert log.count("preempted (step exit 75): requeueing") == 2
    assert "got SIGUSR1 (time limit near): forwarding to the job steps" in log

    assert_same_weights(final_weights(reference[2]), final_weights(run))
    assert results_of(run) == results_of(reference[2])


def test_multinode_sbatch_over_two_nodes_equals_two_ranks_on_one(cluster, shards, reference, tmp_path):
    submit_dir = tmp_path / "submit"
    job = submit_training(
        cluster,
        "train_multinode.sbatch",
        submit_dir,
        shards,
        ["--nodes=2", "--cpus-per-task=1"],
        1,
        "tracking.wandb=false",
    )
    assert_completed(cluster, job, submit_dir)
    log = job_log(submit_dir)
    for rank in (0, 1):
        assert f"1 process(es) x 2 machine(s), machine rank {rank}:" in log
    assert "rendezvous 127.0.0.1:" in log
    run = run_dir_of(submit_dir, job, "histo-dist-mn")
    assert json.loads((run / "provenance.json").read_text())["world_size"] == 2
    assert_same_weights(final_weights(reference[2]), final_weights(run))


def test_a_two_node_job_preempted_and_requeued_on_one_node_trains_every_sample_once(
    cluster, shards, reference, tmp_path
):
    """Elastic resume on SLURM: a 2-node job (2 ranks); a higher-priority job takes one node, ours is preempted
    (SIGTERM: checkpoint, 75, requeue) and, resized while pending (`scontrol update NumNodes=1`), comes back on the
    other node alone: one rank, gradient accumulation 2 keeps the global batch of 16, and every epoch trains each
    sample exactly once."""
    submit_dir = tmp_path / "submit"
    job = submit_training(
        cluster,
        "train_multinode.sbatch",
        submit_dir,
        shards,
        ["--nodes=2", "--cpus-per-task=1"],
        1,
        "tracking.wandb=false",
        "tracking.log_samples=true",
    )
    run = run_dir_of(submit_dir, job, "histo-dist-mn")
    watch = dict(cluster=cluster, job=job, submit_dir=submit_dir)
    wait_until(lambda: logged_step(run) >= 4, "the first steps on two nodes", timeout=180, **watch)
    nodes = cluster.run(["scontrol", "show", "hostnames", cluster.job(job)["NodeList"]]).stdout.split()
    assert len(nodes) == 2, nodes
    urgent = cluster.sbatch(
        [
            "--partition=urgent",
            f"--nodelist={nodes[1]}",
            "--exclusive",
            "--mem=0",
            f"--output={tmp_path}/urgent.out",
            "--wrap",
            "sleep 90",
        ],
        cwd=tmp_path,
    )
    # Requeued, it waits for two nodes while the urgent job holds one: resized while pending, it starts on one.
    wait_until(
        lambda: "preempted (SIGTERM)" in job_log(submit_dir) and cluster.job(job).get("JobState") == "PENDING",
        "the requeued job, pending",
        **watch,
    )
    cluster.run(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1"])  # one task per node
    info = assert_completed(cluster, job, submit_dir, timeout=300)
    cluster.run(["scancel", str(urgent)], check=False)
    log = job_log(submit_dir)
    assert int(info["Restarts"]) == 1 and "preempted (SIGTERM): checkpoint at step" in log, errors_in(log)
    assert "gradient accumulation 2 (configured 1) keeps its global batch of 16" in log, errors_in(log)
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {r["world_size"] for r in records} == {2, 1}
    steps = {(r["epoch"], r["step"]): r["keys"] for r in records}  # a step retrained after the requeue counts once
    for epoch in range(3):
        keys = [k for (e, _), ks in steps.items() if e == epoch for k in ks]
        assert len(keys) == len(set(keys)) == 240, epoch  # 15 steps x 16, each sample at most once
    expected, got = final_weights(reference[2]), final_weights(run)
    for key in expected:  # the same global batches; the reduction order differs (2 ranks vs accumulation)
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


def test_convert_sbatch_array_writes_parts_then_the_manifest(cluster, tmp_path):
    from tests.source_data import tree_hashes, write_pcam

    source = tmp_path / "pcam"
    write_pcam(source, {"train": 200, "valid": 60, "test": 60}, gz=True)
    options = ["--samples-per-shard", "32"]
    out = tmp_path / "shards"
    array = cluster.sbatch(
        [
            "--partition=debug",
            "--array=0-2",
            "--cpus-per-task=1",
            "--mem=0",
            "--time=10",
            f"--export=ALL,INPUT={source},OUTPUT={out}",
            ROOT / "slurm" / "convert.sbatch",
            *options,
        ],
        cwd=tmp_path,
        env=JOB_ENV,
    )
    wait_until(
        lambda: (out / "manifest.json").exists() and not cluster.run(["squeue", "-h"]).stdout.strip(),
        "the array and the manifest job",
        timeout=180,
        poll=0.5,
    )
    log = job_log(tmp_path)
    tasks = cluster.array_jobs(array)
    assert sorted(t["JobState"] for t in tasks) == ["COMPLETED"] * 3, tasks
    # 11 shards in the plan (train 7, valid 2, test 2); task i writes positions i, i+3, ...
    for i, mine in enumerate((4, 4, 3)):
        assert f"part {i}/3: {mine} of 11 shards complete" in log, log
    manifest_job = cluster.job(int(re.search(r"submitted manifest job (\d+)", log)[1]))
    assert manifest_job["JobState"] == "COMPLETED", manifest_job
    assert manifest_job["StartTime"] >= max(t["EndTime"] for t in tasks)  # afterok: once every task is done
    assert "OK: 320 samples verified" in log

    # The same bytes as one process converting everything.
    single = tmp_path / "single"
    done = subprocess.run(
        [
            str(BIN / "histo-dist"),
            "convert",
            "--input",
            str(source),
            "--output",
            str(single),
            "--no-progress",
            "--workers",
            "1",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert tree_hashes(out) == tree_hashes(single)
