# `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

# Everything (the torch and test extras too), each package at its requirements.lock pin: the
# locked tree first (it holds the setuptools that builds the editable install), then the
# package with its extras, constrained by the lock.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q -c requirements.lock --no-build-isolation -e '.[torch,test]'
	touch $(STAMP)

install: $(STAMP)

# 8 virtual CPU devices so the sharding tests see a real mesh. The suite is dominated by XLA
# compiling tiny models, so the tests compile with cheaper CPU backend passes (about half the
# compile time; the tiny models run fast either way).
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 \
                  --xla_llvm_disable_expensive_passes=true
test: install
	XLA_FLAGS="$(TEST_XLA_FLAGS)" JAX_PLATFORMS=cpu $(PY) -m pytest -x -q

demo: install
	$(PY) -m imprint_jax.demo --out demo_out

bench: install
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/train_step.py --inputs latents
	$(PY) benchmarks/networks.py
	$(PY) benchmarks/networks.py --scale cpu32
	$(PY) benchmarks/sampling.py --batches 1,8,32
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) demo_out
