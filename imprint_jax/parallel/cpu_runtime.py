"""Process settings that keep XLA:CPU from paying for fresh memory on every step (Linux).

A compiled step's temporaries are one block (the "temporaries" of `benchmarks/train_step.py`'s
memory line). JAX's CPU client runs a computation on a worker thread by default, which glibc's
malloc serves from a secondary arena. There, blocks above the mmap threshold (32 MiB at most) are mapped from the kernel when
allocated and unmapped when freed, so every step faults its temporaries back in page by page,
each page zero-filled by the kernel (`getrusage` around single steps shows the faults and the
system time; tests/test_cpu_runtime.py counts them).

Two settings remove that cost, and only together:

  * `inline_cpu_dispatch`: JAX's CPU client runs single-device computations on the calling
    thread (`jax_cpu_enable_async_dispatch=False`), whose allocations come from glibc's main
    arena. It must be set before JAX creates its backends. It changes nothing for GPU or TPU
    computations, nor for computations over several CPU devices (those stay asynchronous).
  * `retain_freed_memory`: the main arena grows by `brk` instead of mapping large blocks
    (`M_MMAP_MAX` = 0) and keeps freed memory instead of returning it to the kernel
    (`M_TRIM_THRESHOLD` at its maximum), so the next step reuses the same pages. The
    process's resident memory then stays at its peak. A call now and then still grows the
    heap, and faults in the new pages, when other allocations took the freed block's place.
    glibc only (a no-op elsewhere); it applies to allocations made after the call.

Either setting alone leaves the page faults as they were. The malloc setting is process-wide:
in the benchmarks, which run torch in the same process, torch's steps stop page-faulting too,
so both frameworks gain alike (docs/performance.md).

The command line (`imprint-jax`, except `plan`), the demo and the benchmarks call
`configure()` before JAX starts, and the places that compile steps (`train.loop`,
`compositing`, the benchmarks) call `on_platform()`, which retains freed memory only when
the steps are for the CPU. IMPRINT_JAX_CPU_RUNTIME=default in the environment keeps JAX's
and glibc's defaults (to compare, or to have freed memory returned to the system). Library
users who run on the CPU can call `configure()` at the top of their program.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

from imprint_jax.errors import UserError

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
_ASYNC = "jax_cpu_enable_async_dispatch"

ENV = "IMPRINT_JAX_CPU_RUNTIME"  # 'default' turns both settings off (for comparisons)
_wanted = False    # configure() ran (and was not turned off)
_retained = False  # retain_freed_memory() is in effect


def jax_backends_started() -> bool:
  """True once JAX has created a backend (settings read at client creation no longer apply)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # here: at the top it would import JAX before configure()
    return bool(xla_bridge._backends)  # pylint: disable=protected-access
  except Exception:  # noqa: BLE001 - private API moved: assume started
    return True


def inline_cpu_dispatch() -> bool:
  """Runs JAX's single-device CPU computations on the calling thread. True when set; False
  (with a warning) when JAX's backends already exist and the setting can no longer apply.
  Imports JAX: environment variables JAX reads at import (JAX_PLATFORMS) must be set first."""
  import jax  # here, not at the top: the command line sets JAX's environment before this call
  if jax_backends_started():
    asynchronous = jax.config.read(_ASYNC)
    if asynchronous:
      log.warning("JAX already started: its CPU computations stay asynchronous (call"
                  " imprint_jax.parallel.cpu_runtime.configure() before using JAX)")
    return not asynchronous
  jax.config.update(_ASYNC, False)
  return True


def retain_freed_memory() -> bool:
  """Makes glibc's malloc keep large freed blocks mapped for reuse. True when in effect."""
  global _retained
  if _retained:
    return True
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  _retained = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
  return _retained


def configure() -> str:
  """Inline CPU dispatch now, and freed memory retained once a computation is compiled for the
  CPU (`on_platform`), unless the environment has IMPRINT_JAX_CPU_RUNTIME=default. Returns a
  one-line description (for logs and benchmark headers)."""
  global _wanted
  choice = os.environ.get(ENV, "tuned")
  if choice not in ("tuned", "default"):
    raise UserError(f"{ENV}={choice!r}: expected 'tuned' or 'default'")
  if choice == "default":
    return f"JAX's default CPU dispatch and malloc settings ({ENV}=default)"
  _wanted = True
  inline = inline_cpu_dispatch()
  return (f"CPU dispatch {'inline' if inline else 'asynchronous'}; glibc keeps freed memory"
          " in CPU runs")


def on_platform(platform_name: str) -> bool:
  """Where steps are compiled: retains freed memory if `configure()` ran and the steps are
  for the CPU (GPU and TPU hosts keep glibc's defaults: nothing to gain there). True when
  memory is retained."""
  if _wanted and platform_name == "cpu":
    return retain_freed_memory()
  return _retained
