# The README's two commands:  `make demo` (main job)  and  `make test`.  `make bench`: the benchmark suite.
# Each sets up .venv from scratch on a fresh machine, builds the extension, then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.requirements-installed

.PHONY: install build test bench demo clean cuda-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

# ninja rebuilds only what changed; torch must already be installed, hence no build isolation.
build: $(STAMP)
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .

install: build

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/deconvseg-fast bench

demo: install
	$(BIN)/deconvseg-fast video --demo -o demo_out/demo.mp4

# No GPU needed: builds the CUDA kernels out of tree in its own venv (.venv-cuda, torch's CUDA
# build), then checks every op's CUDA registration, ptxas spills and the sm_80/sm_90 code.
cuda-check:
	PYTHON=$(PYTHON) bash .ci/cuda_check

clean:
	rm -rf build *.egg-info deconvseg_fast/_C*.so
