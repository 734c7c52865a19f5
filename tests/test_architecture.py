"""docs/architecture.md stays true: its module table lists every module and exactly the histo_dist
modules each one imports; data modules import no torch; only commands print."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from histo_dist.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "histo_dist"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))


def documented_imports() -> dict[str, set[str]]:
    """{module: the modules its 'may import' cell names} from the table in docs/architecture.md."""
    table = {}
    for line in (ROOT / "docs/architecture.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(\w+)\.py`", cells[0]) if len(cells) == 4 else None
        if match:
            cell = re.sub(r"\(.*?\)", "", cells[3])  # "(command modules, lazily)" is the CLI's note
            table[match.group(1)] = {name.strip() for name in cell.split(",") if name.strip() not in ("", "–")}
    return table


def actual_imports(module: str) -> set[str]:
    """histo_dist modules `module` imports anywhere (top level or inside functions), plus the command
    modules the CLI imports by name."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("histo_dist."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "histo_dist":
            found.update(a.name for a in node.names if a.name != "__version__")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("histo_dist."))
    if module == "cli":
        found.update(name.split(".")[1] for name, _ in COMMANDS.values())
    return found


def test_the_module_table_lists_every_module():
    assert sorted(documented_imports()) == MODULES


@pytest.mark.parametrize("module", MODULES)
def test_a_module_imports_what_the_table_says(module):
    documented = documented_imports()[module]
    if module == "cli":
        documented |= {name.split(".")[1] for name, _ in COMMANDS.values()}
    assert actual_imports(module) == documented, f"{module}.py: docs/architecture.md says {sorted(documented)}"


def test_only_the_cli_imports_train():
    assert [m for m in MODULES if "train" in actual_imports(m)] == ["cli"]


def test_data_modules_do_not_import_torch():
    """Conversion workers and `histo-dist verify` start without torch's seconds of import time."""
    code = (
        "import sys, histo_dist.sources, histo_dist.manifest, histo_dist.shards, histo_dist.convert, "
        "histo_dist.verify; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_only_commands_print():
    """print() only in a command's run() and the print_* functions it calls: library code logs."""
    offenders = []
    for module in MODULES:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            if function.name == "run" or function.name.startswith("print_") or module == "cli":
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    offenders.append(f"{module}.{function.name}:{node.lineno}")
    assert not offenders
