"""imprint_jax.parallel.cpu_runtime: a step's temporaries stop being page-faulted back in every call."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from imprint_jax.parallel import cpu_runtime
from imprint_jax.errors import UserError

# A computation whose 128 MiB temporary (the cumulative sum) is not an output: by default each
# call maps it fresh from the kernel; with the settings the same pages are reused. The median
# call counts: with the settings an occasional call still grows the heap (measured: 1 in 4
# processes had one or two such calls among eight), which a mean over a few calls would catch.
_PROBE = textwrap.dedent("""
    import resource, sys
    from imprint_jax.parallel import cpu_runtime
    print(cpu_runtime.configure(), cpu_runtime.on_platform("cpu"), file=sys.stderr)
    import jax, jax.numpy as jnp
    x = jnp.ones((8192, 4096), jnp.float32)
    f = jax.jit(lambda x: jnp.cumsum(x, 0)[::512].sum())
    for _ in range(2):
      f(x).block_until_ready()
    faults = []
    for _ in range(9):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(faults)[4])
""")


def _median_page_faults_per_call(setting: str) -> int:
  env = dict(os.environ, IMPRINT_JAX_CPU_RUNTIME=setting, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  res = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                       text=True, check=True)
  return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the settings are for Linux with glibc")
def test_configure_removes_page_faults_of_temporaries():
  default = _median_page_faults_per_call("default")
  tuned = _median_page_faults_per_call("tuned")
  # 128 MiB of 4 KiB pages is 32768 faults; the default pays them on every call
  assert default > 16_000, default
  assert tuned < 500, tuned


def test_freed_memory_retained_only_for_cpu_steps():
  probe = textwrap.dedent("""
      from imprint_jax.parallel import cpu_runtime
      cpu_runtime.configure()
      print(cpu_runtime.on_platform("tpu"), cpu_runtime.on_platform("cpu"))
  """)
  env = dict(os.environ, IMPRINT_JAX_CPU_RUNTIME="tuned", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                       check=True)
  glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
  assert res.stdout.split() == ["False", str(glibc)]


def test_configure_rejects_unknown_setting(monkeypatch):
  monkeypatch.setenv(cpu_runtime.ENV, "fast")
  with pytest.raises(UserError, match="IMPRINT_JAX_CPU_RUNTIME='fast'"):
    cpu_runtime.configure()


def test_inline_dispatch_after_jax_started_reports_it_cannot_apply():
  import jax
  jax.numpy.zeros(()).block_until_ready()  # JAX has started in this process
  asynchronous = jax.config.read("jax_cpu_enable_async_dispatch")
  assert cpu_runtime.inline_cpu_dispatch() is (not asynchronous)
  assert jax.config.read("jax_cpu_enable_async_dispatch") == asynchronous  # left alone
