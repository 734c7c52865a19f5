"""A real single-node SLURM on loopback, all state in one folder, for tests and experiments.

munged, slurmctld and slurmd from the distribution's packages run in the foreground under `setsid`,
are recorded by PID and stopped by PID (after `scancel` and an empty queue: stopping slurmd does not
stop the jobs' processes). What was measured about this setup is in ../shared/design/slurm-notes.md.

    python -m tests.slurm.cluster start DIR     # prints `export SLURM_CONF=DIR/etc/slurm.conf`
    python -m tests.slurm.cluster stop DIR
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel", "munged", "mungekey"]
SBIN = ["/usr/sbin", "/sbin"]


class ClusterUnavailable(Exception):
    """SLURM cannot run here; the message says why (tests skip with it)."""


def which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path=os.pathsep.join(SBIN))


def ensure_installed(install: bool = True) -> None:
    """Install the distribution's SLURM and munge packages when missing (root and apt-get only)."""
    missing = [p for p in PROGRAMS if which(p) is None]
    if not missing:
        return
    if not install:
        raise ClusterUnavailable(f"not installed: {', '.join(missing)}")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"not installed ({', '.join(missing)}) and not root, so cannot apt-get install them")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"not installed ({', '.join(missing)}) and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` timed out") from None
        if out.returncode != 0:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {(out.stderr or out.stdout)[-500:]}")
    missing = [p for p in PROGRAMS if which(p) is None]
    if missing:
        raise ClusterUnavailable(f"still missing after installing {PACKAGES}: {', '.join(missing)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=histotest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=2,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


class Cluster:
    """slurmctld + munged + one slurmd per node (n1, n2, ...; all on 127.0.0.1, each with its own
    port and spool: several slurmd on one host), everything under `root`. Node names do not resolve
    as hostnames; their NodeAddr (127.0.0.1) does, which is what the sbatch scripts use.

    Partitions: `debug` (default; its jobs are requeued when preempted, after a 60 s grace time
    in which they get SIGTERM) and `urgent` (higher priority tier: its jobs preempt debug jobs).
    """

    def __init__(self, root: Path, nodes: int = 2, cpus: int | None = None):
        self.root = Path(root).resolve()
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus or os.cpu_count() or 1  # per node; more than the hardware has drains the node
        self.conf = self.root / "etc" / "slurm.conf"
        self.pids_file = self.root / "run" / "pids.json"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [
            k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"
        ]:
            del self.env[key]  # a test run inside a SLURM job must not leak that job into ours

    # -- start / stop ----------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        ensure_installed()
        for sub in ("etc", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        munge.mkdir(exist_ok=True)
        munge.chmod(0o711)
        key = munge / "munge.key"
        self._check([which("mungekey"), "--create", f"--keyfile={key}", "--force"])
        key.chmod(0o600)
        hostname = socket.gethostname().split(".")[0]
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={hostname} Port={free_port()} CPUs={self.cpus} "
            "RealMemory=1000 State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(
            SLURM_CONF.format(root=self.root, ctld_port=free_port(), slurmd_port=free_port(), nodes=nodes)
        )
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(parents=True, exist_ok=True)
        pids: dict[str, int] = {}
        try:
            pids["munged"] = self._spawn(
                "munged",
                [
                    which("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={munge}/munge.socket.2",
                    f"--key-file={key}",
                    f"--log-file={self.root}/log/munged.log",
                    f"--pid-file={munge}/munged.pid",
                    f"--seed-file={munge}/munged.seed",
                ],
            )
            self._wait(lambda: (munge / "munge.socket.2").exists(), 10, "munged did not create its socket")
            pids["slurmctld"] = self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(
                lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
                timeout,
                "slurmctld did not answer `scontrol ping`",
            )
            for n in self.nodes:
                pids[f"slurmd-{n}"] = self._spawn(f"slurmd-{n}", [which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._wait(
                lambda: self.node_states() == ["idle"] * len(self.nodes), timeout, "the nodes did not become idle"
            )
        except BaseException:
            self.pids_file.write_text(json.dumps(pids))
            self.stop()
            raise
        self.pids_file.write_text(json.dumps(pids))

    def stop(self, timeout: float = 60) -> None:
        """Cancel all jobs, wait for the queue to empty (the jobs' processes end), stop the daemons by PID."""
        pids = json.loads(self.pids_file.read_text()) if self.pids_file.exists() else {}
        if pids.get("slurmctld") and _alive(pids["slurmctld"]):
            self._ok(["scancel", "--user", str(os.geteuid())])
            deadline = time.time() + timeout
            while time.time() < deadline and self._ok(["squeue", "-h"]) and self._out(["squeue", "-h"]).strip():
                time.sleep(0.5)
        for name in [*(k for k in pids if k.startswith("slurmd")), "slurmctld", "munged"]:
            pid = pids.get(name)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.time() + 15
                while _alive(pid) and time.time() < deadline:
                    time.sleep(0.1)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
                _reap(pid)
        self.pids_file.unlink(missing_ok=True)

    def _spawn(self, name: str, cmd: list[str]) -> int:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )  # setsid: not in our process group, not signalled with it
        log.close()
        _CHILDREN[proc.pid] = proc
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ClusterUnavailable(f"{name} exited with {proc.returncode} at start: {self.log_tail(name)}")
        return proc.pid

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not predicate():
            if time.time() > deadline:
                raise ClusterUnavailable(
                    f"{what} within {timeout:.0f} s; logs: {self.log_tail('slurmctld')} "
                    f"{self.log_tail('slurmd-' + self.nodes[0])}"
                )
            time.sleep(0.2)

    # -- client calls ----------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(
            cmd, capture_output=True, text=True, env={**self.env, **kw.pop("env", {})}, timeout=timeout, **kw
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"`{' '.join(map(str, cmd))}` exited {out.returncode}: {out.stderr.strip()}")
        return out

    def _ok(self, cmd: list[str]) -> bool:
        try:
            return self.run(cmd, check=False, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _out(self, cmd: list[str]) -> str:
        return self.run(cmd, check=False, timeout=20).stdout

    def _check(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if out.returncode != 0:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {out.stderr.strip()}")

    def node_states(self) -> list[str]:
        return [self._out(["sinfo", "-h", "-n", n, "-o", "%T"]).strip() for n in self.nodes]

    def sbatch(self, args: list[str], cwd: Path | None = None, env: dict | None = None) -> int:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *map(str, args)], cwd=cwd, env=env or {})
        return int(out.stdout.strip().split(";")[0].split("_")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as key -> value (first record; empty once the job is forgotten)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        fields: dict[str, str] = {}
        if out.returncode != 0 or not out.stdout.strip():
            return fields
        for token in out.stdout.splitlines()[0].split():
            if "=" in token:
                key, value = token.split("=", 1)
                fields.setdefault(key, value)
        return fields

    def array_jobs(self, job_id: int) -> list[dict[str, str]]:
        """Every task of an array job, as `scontrol show job` fields."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        return [dict(t.split("=", 1) for t in line.split() if "=" in t) for line in out.splitlines() if line.strip()]

    def wait_for(
        self,
        job_id: int,
        states: tuple[str, ...] = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
        ),
        timeout: float = 300,
    ) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(
                    f"job {job_id} not in {states} after {timeout:.0f} s: {info.get('JobState')} "
                    f"{info.get('Reason')}; slurmctld: {self.log_tail('slurmctld', 1500)}"
                )
            time.sleep(0.5)

    def jobcomp(self) -> list[dict[str, str]]:
        """Finished jobs as slurmctld's jobcomp/filetxt recorded them (one record per run of a job)."""
        path = self.root / "log" / "jobcomp.txt"
        if not path.exists():
            return []
        return [dict(t.split("=", 1) for t in line.split() if "=" in t) for line in path.read_text().splitlines()]

    def log_tail(self, name: str, chars: int = 800) -> str:
        text = ""
        for suffix in (".log", ".stdout"):
            path = self.root / "log" / f"{name}{suffix}"
            if path.exists():
                text += path.read_text(errors="replace")[-chars:]
        return text or f"(no log of {name})"


_CHILDREN: dict[int, subprocess.Popen] = {}


def _alive(pid: int) -> bool:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of another parent counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    cluster = Cluster(Path(argv[1]))
    if argv[0] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
