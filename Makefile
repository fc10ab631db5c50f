# The two set-up commands of the README: `make train` (the main job) and `make test`.
# Each makes the virtual environment it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# An index to take torch from, e.g. https://download.pytorch.org/whl/cpu for the CPU build where
# pip would otherwise resolve the pin to a multi-GB CUDA build.
TORCH_INDEX ?=

.PHONY: train test bench

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned here, not in setup.py: a bare `torch` requirement would take whatever build
	# the index offers.
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/din-fast train

test: $(VENV)/.installed
	$(PY) -m pytest tests

bench: $(VENV)/.installed
	$(VENV)/bin/din-fast bench
