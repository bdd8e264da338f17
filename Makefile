# Two commands for a newcomer: `make demo` (the main job) and `make test` (lint and the whole test suite;
# `pytest -m 'not slow'` is the quick tier for everyday work).
# Both create .venv and install what they need; torch comes as torch==2.13.0, the build pip finds (TORCH_SPEC
# chooses another, e.g. a +cpu build), unless the environment already has a torch >= 2.6: a GPU user's own
# build is kept when it is in that environment (.venv, or the one VENV= names).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: $(PY)
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -e ".[dev]"

demo: setup
	$(VENV)/bin/poetlm train

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .cache
