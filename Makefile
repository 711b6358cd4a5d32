# The two commands of the README:
#   make bench   the ResNet-50 correctness-and-speed report (the main job)
#   make test    the test suite (what .ci/run calls)
# Each creates the environment in $(VENV) first when it is missing. On a machine that already
# has torch/triton (the lent GPU machine, no network) use `make test SYSTEM=1`: it installs
# only this package, editable, into the current python3.

PYTHON ?= python3
VENV ?= .venv
# Pinned to the builds served from this project's machines' local disk; the GPU machine's own
# torch 2.11 / triton 3.6 are used through SYSTEM=1.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
BENCH_ARGS ?=

ifeq ($(SYSTEM),1)
PY := $(PYTHON)
STAMP := .system-installed
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

.PHONY: test bench gpu-test bench-kernels build-cuda kernel-report clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip 'setuptools>=77' wheel
	$(VENV)/bin/python -m pip install -q $(TORCH_PINS)
	$(VENV)/bin/python -m pip install -q -e '.[dev,timm,cuda]'
	touch $@

.system-installed: pyproject.toml setup.py
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.report $(BENCH_ARGS)

# Everything that needs CUDA (skips cleanly elsewhere); the lent GPU machine runs this.
gpu-test: $(STAMP)
	$(PY) -m pytest -q tests/gpu $(PYTEST_ARGS)

# pytest-benchmark timings of a few layers and blocks per backend (needs CUDA; see its doc)
bench-kernels: $(STAMP)
	$(PY) -m pytest -q benchmarks/test_bench_kernels.py --benchmark-only $(PYTEST_ARGS)

build-cuda: $(STAMP)
	$(PY) -m resnet_fast.build

kernel-report: $(STAMP)
	$(PY) -m resnet_fast.kernel_report

clean:
	rm -rf $(VENV) .system-installed build dist *.egg-info .pytest_cache
