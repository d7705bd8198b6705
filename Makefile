# The two README commands: `make demo` runs the main job end to end, `make test` runs the tests.
# Each creates the virtual environment and installs what is missing first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean plots-template

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cass demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

# The offline page template of `dvc plots show` (Vega inline), rebuilt from the npm registry: docs/dvc.md.
plots-template:
	bash .dvc/plots/build_offline_html.sh

clean:
	rm -rf outputs mlruns mlflow.db .prefect .pytest_cache dvc_plots
