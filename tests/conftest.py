"""Shared test set-up: a persistent XLA compilation cache for the session.

Many tests compile the same tiny models (the training tests compile one step several times);
JAX's persistent cache turns the repeats into cache hits. The cache lives in a temporary
folder of the session, so every `make test` starts cold, as CI does.
"""

import os
import tempfile

import jax
import pytest

_CACHE_DIR = tempfile.mkdtemp(prefix="imprint-jax-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ.setdefault("IMPRINT_JAX_TEST_CACHE", _CACHE_DIR)  # for subprocesses of tests


@pytest.fixture(scope="session")
def xla_cache_dir() -> str:
  return _CACHE_DIR
