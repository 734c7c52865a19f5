"""How the `histo-dist` command ends: with main()'s exit code, after what a normal exit does, without the
interpreter's teardown of its modules (seconds with torch loaded)."""

from __future__ import annotations

import subprocess
import sys

from tests.runs import BIN, ENV

PRELUDE = """
import atexit, sys, threading, time
from histo_dist.cli import exit_without_teardown

class TornDown:  # a module global's finalizer runs in the interpreter's teardown, and only there
    def __del__(self):
        print(" torn down", end="")

kept = TornDown()
atexit.register(lambda: print(" exit handler", end=""))
print("printed", end="")  # still in stdout's buffer (a pipe) when the exit comes
"""


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, env=ENV, timeout=60)


def test_the_exit_keeps_the_code_runs_exit_handlers_flushes_output_and_skips_the_teardown():
    out = python("exit_without_teardown(3)")
    assert out.returncode == 3, out.stderr
    assert out.stdout == "printed exit handler"


def test_a_running_non_daemon_thread_is_waited_for_by_a_normal_exit():
    out = python(
        "threading.Thread(target=lambda: (time.sleep(0.3), print(' thread done', end=''))).start()\n"
        "exit_without_teardown(4)"
    )
    assert out.returncode == 4, out.stderr
    assert out.stdout == "printed thread done exit handler torn down"


def test_the_command_and_the_module_end_with_mains_exit_code():
    for cmd in ([sys.executable, "-m", "histo_dist"], [str(BIN / "histo-dist")]):
        out = subprocess.run([*cmd, "train", "--config", "/nonexistent.yaml"], capture_output=True, text=True, env=ENV)
        assert out.returncode == 2, out.stderr
        assert "/nonexistent.yaml" in out.stderr
