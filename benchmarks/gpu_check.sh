#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): PASS/FAIL for each risky CUDA path plus figures, a few minutes on
# one GPU. Without CUDA it prints SKIP and exits 0 (nothing was checked). Exit 1 when a path fails.
#   benchmarks/gpu_check.sh [--work DIR]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3
exec "$PYTHON" "$REPO/benchmarks/gpu_check.py" "$@"
