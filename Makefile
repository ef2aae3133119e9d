# `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# 8 virtual CPU devices so the sharding tests see a real mesh.
test: install
	XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -x -q

demo: install
	JAX_PLATFORMS=$${JAX_PLATFORMS:-} $(PY) -m imprint_jax.demo --out demo_out

bench: install
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/sampling.py
	$(PY) benchmarks/data_throughput.py

clean:
	rm -rf $(VENV) demo_out
