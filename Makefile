# Two commands do all set-up on a fresh machine (python3 and the package registries only):
#   make demo   the main job on the embedded synthetic PCam set
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo-out

# Install torch/torchvision from the package registry as users do. PIP_CONFIG_FILE/PIP_FIND_LINKS
# are blanked for this venv only: some machines carry a CPU-only torch wheel in a find-links folder
# that pip would prefer (2.x.y+cpu sorts above 2.x.y), and the registry's torchvision cannot import
# against it.
PIP := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(BIN)/python -m pip

.PHONY: venv demo lint test clean
venv: $(VENV)/.installed

# uv installs the 3 GB of torch's CUDA wheels in about a minute where pip takes 2.5 (it downloads and
# byte-compiles in parallel); it reads neither pip's config nor PIP_FIND_LINKS. --compile-bytecode
# because uv does not compile by default, and where PYTHONDONTWRITEBYTECODE is set (as on our CI
# machines) every process would then compile torch's sources again at import: the suite took 29
# minutes instead of 19. If uv cannot be had or fails, pip does the same install.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	-$(PIP) install -q uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]' \
	  || { echo 'uv failed (above): installing with pip'; $(PIP) install -q --upgrade pip && $(PIP) install -q -e '.[dev]'; }
	touch $@

# The main job on the embedded default: synthetic PCam -> shards -> verify -> train -> evaluate.
demo: venv
	$(BIN)/histo-dist synth --output $(DEMO)/pcam-synth --n-train 2048 --n-valid 512 --n-test 512 --seed 0 --overwrite
	$(BIN)/histo-dist convert --input $(DEMO)/pcam-synth --output $(DEMO)/shards --overwrite
	$(BIN)/histo-dist verify $(DEMO)/shards
	rm -rf $(DEMO)/run
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/histo-dist train --config configs/cpu_test.yaml --run-dir $(DEMO)/run data.shards=$(DEMO)/shards
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/histo-dist evaluate --checkpoint $(DEMO)/run/checkpoints/best.pt --data $(DEMO)/shards --split test --threshold youden --tta --output $(DEMO)/eval
	@echo "demo: run in $(DEMO)/run, evaluation (metrics.json, predictions.csv, plots) in $(DEMO)/eval"

# Style first (ruff: formatting and a small rule set, pyproject.toml [tool.ruff]), then the suite.
lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# Two pytest workers, each taking whole files (--dist loadfile: a file's module fixtures, such as a reference
# run or a SLURM cluster, are made once). Most slow tests wait on processes they started, so serially the suite
# kept only about one of two cores busy: on 2 cores it took 18 min 11 s serially and 13 min 21 s so
# (docs/benchmarks.md). `pytest` alone still runs serially, for debugging one test.
TEST_WORKERS ?= 2
test: venv lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) $(DEMO)
