# Quick start: `make demo` (install + run the embedded default), `make test` (install + run the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	# pip takes it (uv does not look on that disk); uv installs the rest: parallel downloads, and it
	# byte-compiles all of site-packages (torch included, hence pip's --no-compile) on every core.
	# A fresh install takes ~70 s here instead of pip's ~160 s.
	$(PY) -m pip install -q --no-compile torch==2.13.0 uv
	# only its data file (the real CLIP BPE vocabulary) is used; its dependencies would drag in torchvision.
	$(UV) pip install --python $(PY) -q --compile-bytecode --no-deps open-clip-torch==3.3.0
	$(UV) pip install --python $(PY) -q --compile-bytecode -e '.[test]'
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
