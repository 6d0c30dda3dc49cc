# Quick start: `make demo` (install + run the embedded default), `make test` (install + run the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# only its data file (the real CLIP BPE vocabulary) is used; its dependencies would drag in torchvision.
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(VENV)/bin/lorasynth demo --out demo_out

bench: $(STAMP)
	$(PY) scripts/bench_apply.py

clean:
	rm -rf $(VENV) demo_out
