# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
# CPU pins for the development/CI machines (torch 2.14.1 + torchvision 0.29.1 from local disk); GPU users
# install the CUDA build of torch they run first, then `pip install -e .` (see README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint clean-reports

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[test,ray]' $(TORCH_PINS)
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/probe run suites/smoke.yaml

test: install
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check probe tests benchmarks
	$(BIN)/mypy probe
	$(BIN)/lint-imports

lint: install
	$(BIN)/ruff check probe tests benchmarks
	$(BIN)/mypy probe
	$(BIN)/lint-imports

clean-reports:
	find reports -mindepth 1 -not -name .gitkeep -exec rm -rf {} +
