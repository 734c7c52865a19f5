"""Print several evaluations side by side: one column per evaluation, one row per metric.

    histo-dist compare EVAL_A/ EVAL_B/metrics.json RUN_C/ [--format markdown|csv]

Each argument is a metrics.json written by `histo-dist evaluate`, a folder holding one, or a run
folder (its test/metrics.json, the evaluation of its best checkpoint at the end of training). An
evaluation with TTA adds a second column (`NAME +TTA`). The best value of each metric is marked
with `*` (lowest for NLL and ECE); `-` is a metric that evaluation does not have. AUROC and
accuracy show their 95% bootstrap interval when one was computed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

from histo_dist.errors import HistoDistError
from histo_dist.files import check_input

ROWS = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "auroc",
    "average_precision",
    "nll",
    "ece",
)
LOWER_IS_BETTER = {"nll", "ece"}
WITH_CI = ("auroc", "accuracy")


class CompareError(HistoDistError):
    """An argument of `compare` that is not an evaluation."""


def find_metrics(location: str | Path) -> Path:
    path = check_input(location, "evaluation")
    if path.is_file():
        return path
    for name in ("metrics.json", "test/metrics.json"):
        if (path / name).is_file():
            return path / name
    raise CompareError(
        f"{path}: holds neither metrics.json (histo-dist evaluate) nor test/metrics.json (a training run)"
    )


def load_evaluation(location: str | Path) -> dict[str, Any]:
    path = find_metrics(location)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: not a readable metrics JSON file ({e})") from None
    if not isinstance(data, dict) or not any(k in data for k in ROWS):
        raise CompareError(f"{path}: holds no metrics ({', '.join(ROWS[:4])}, ...)")
    return data


def _names(locations: list[str]) -> list[str]:
    """Short, distinct column names: each folder given (or the folder of each file given), with more
    of the path if needed."""
    paths = [Path(loc) for loc in locations]
    parts = [(p.resolve().parent if p.is_file() else p.resolve()).parts for p in paths]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(p) for p in paths]


def columns(locations: list[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, loc in zip(_names(locations), locations):
        data = load_evaluation(loc)
        out.append((name, data))
        if isinstance(data.get("tta"), dict):
            out.append((f"{name} +TTA", {**data, **data["tta"]}))
    return out


def table(cols: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    header = ["metric", *(name for name, _ in cols)]
    rows: list[list[str]] = []

    def info_row(label: str, fn) -> None:
        rows.append([label, *(fn(d) for _, d in cols)])

    info_row("split", lambda d: str(d.get("split", "test")))
    info_row("samples", lambda d: str(int(d["num_samples"])) if "num_samples" in d else "-")
    info_row("model", lambda d: str(d.get("model", "-")))
    info_row(
        "threshold",
        lambda d: (
            f"{d['threshold']:.3f} ({d.get('threshold_method', 'fixed')})"
            if isinstance(d.get("threshold"), (int, float))
            else "-"
        ),
    )
    for metric in ROWS:
        values = [d.get(metric) if isinstance(d.get(metric), (int, float)) else None for _, d in cols]
        if all(v is None for v in values):
            continue
        present = [v for v in values if v is not None]
        best = min(present) if metric in LOWER_IS_BETTER else max(present)
        cells = []
        for (_, d), v in zip(cols, values):
            if v is None:
                cells.append("-")
                continue
            cell = f"{v:.4f}"
            ci = (d.get("ci95") or {}).get(metric) if metric in WITH_CI else None
            if ci:
                cell += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
            if len(present) > 1 and v == best:
                cell += " *"
            cells.append(cell)
        label = metric + (" (lower is better)" if metric in LOWER_IS_BETTER else "")
        rows.append([label, *cells])
    return header, rows


def render(header: list[str], rows: list[list[str]], fmt: str = "text") -> str:
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *rows])
        return buf.getvalue()
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if fmt == "markdown":

        def line(r: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

        return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]) + "\n"

    def line(r: list[str]) -> str:
        return "  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)]) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "evaluations",
        nargs="+",
        metavar="RUN_OR_METRICS",
        help="metrics.json files, folders holding one (histo-dist evaluate --output), or training run folders",
    )
    parser.add_argument(
        "--format", choices=("text", "markdown", "csv"), default="text", help="table format (default: text)"
    )


def run(args: argparse.Namespace) -> int:
    header, rows = table(columns(args.evaluations))
    print(render(header, rows, args.format), end="")
    return 0
