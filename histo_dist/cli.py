"""`histo-dist` command line: one subcommand per job, each defined in its own module.

A command module exposes `configure(parser)` to add its options and `run(args) -> int`; its
docstring's first paragraph is the command's description. Only the module of the command being
run is imported (torch takes seconds to import; `histo-dist --help` should not).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import sys
import threading
from typing import NoReturn

from histo_dist import __version__
from histo_dist.errors import HistoDistError

# name -> (module, one-line help); the order is the order `histo-dist --help` lists them in.
COMMANDS = {
    "synth": ("histo_dist.synth", "write a synthetic PCam-format dataset (the embedded default, no download)"),
    "convert": ("histo_dist.convert", "convert PCam HDF5 / ImageFolder / Kaggle data into WebDataset shards"),
    "verify": ("histo_dist.verify", "check shards against their manifest: sizes, sha256, counts, decoding"),
    "embed": ("histo_dist.embed", "embeddings of image shards from a backbone (timm or a checkpoint), as shards"),
    "train": ("histo_dist.train", "train a classifier on shards (one process, or under `accelerate launch`)"),
    "evaluate": ("histo_dist.evaluate", "evaluate a checkpoint on a split: metrics.json, predictions.csv, plots"),
    "predict": ("histo_dist.predict", "run a checkpoint on new patches (image folder, PCam h5, shards) into a CSV"),
    "compare": ("histo_dist.compare", "print several evaluations side by side"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s own options are configured (the others show their help line)."""
    parser = argparse.ArgumentParser(
        prog="histo-dist",
        description="Distributed training for histopathology patch classification on WebDataset shards.",
    )
    parser.add_argument("--version", action="version", version=f"histo-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_line) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_line)
            continue
        module = importlib.import_module(module_name)
        description = module.__doc__.strip().split("\n\n")[0] if module.__doc__ else help_line
        p = sub.add_parser(
            name, help=help_line, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`train --config C --run-dir R optim.lr=0.01`): argparse
    # cannot take one positional list in two pieces, so the second piece arrives here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        args = parser.parse_args(argv)  # argparse names what it did not recognise, and exits

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except HistoDistError as e:
        print(f"histo-dist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"histo-dist {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> NoReturn:
    """The `histo-dist` command and `python -m histo_dist`: `main()`, then `exit_without_teardown`.
    (Tests call `main(argv)` in their own process: it returns the exit code and exits nothing.)"""
    exit_without_teardown(main())


def exit_without_teardown(code: int) -> NoReturn:
    """Exit as `sys.exit(code)` does, less the interpreter's teardown of its modules.

    That teardown frees every object of every imported module one by one. With torch, torch._dynamo (which
    PyTorch's optimizers import) and torchmetrics loaded, it takes 1.5-2 s of a 2-core CPU at the end of every
    command and every rank, after all the work is written (docs/benchmarks.md, "Start-up and exit"); the OS
    takes the memory back at once. What else a normal exit does still happens, in the same order: a running
    non-daemon thread is waited for (here by a normal exit), the exit handlers run (W&B's teardown, logging's
    flush, loader workers' shutdown, temporary folders), and stdout and stderr are flushed.
    """
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # (CPython's: what `atexit.register` collected; multiprocessing's children do the same)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # closed, gone, or a broken pipe
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
