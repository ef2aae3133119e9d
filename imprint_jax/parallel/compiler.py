"""The compile target: which platform's forms the model code traces (`platform`,
`compiling_for`) and the XLA options its steps are compiled with (`compiler_options`).

Attention, GroupNorm and tiny convolutions have a form per platform (models/attention.py,
models/layers.py); they ask `platform()` while being traced, so a step traced under
`compiling_for('tpu')` on a CPU host (`imprint-jax plan --topology`) gets the TPU forms.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("platform", default=None)


def platform() -> str:
  """The platform the code being traced is compiled for: the one set by `compiling_for`, else
  JAX's default backend. Picks the CPU or accelerator forms of attention, GroupNorm and
  convolution."""
  return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(name: str) -> Iterator[None]:
  """Traces model code for platform `name` ('cpu', 'gpu', 'tpu'), e.g. when compiling ahead
  of time for TPU devices from a CPU host (`imprint-jax plan --topology`). JAX caches traces
  per function object and does not see this setting: trace a function not traced before."""
  token = _PLATFORM.set(name)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


# XLA:CPU (jaxlib 0.10.2) hands dots, reductions and convolutions to YNNPACK by default. Its
# 3x3 convolutions at 32-128 channels run at about half the speed of XLA's own (Eigen) ones on
# this project's CPU shapes, so our compiled steps keep YNNPACK for dots and reductions only.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
               "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(name: str | None = None) -> dict[str, str] | None:
  """XLA options for compiling the model's steps for platform `name` (default: `platform()`),
  for `jax.jit(..., compiler_options=...)` or `Lowered.compile`; None where there are none.
  An XLA that does not know an option (another jaxlib) gets none, with a warning."""
  if (name or platform()) != "cpu":
    return None
  return dict(CPU_OPTIONS) if cpu_options_accepted() else None


@functools.cache
def cpu_options_accepted() -> bool:
  """Whether this XLA compiles with `CPU_OPTIONS` (probed once, on a one-op program)."""
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    x = jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu)
    with jax.set_mesh(None):  # a caller's multi-device mesh would refuse the one-device probe
      jax.jit(lambda x: x + 1).lower(x).compile(compiler_options=CPU_OPTIONS)
    return True
  except Exception as e:  # noqa: BLE001 - any refusal means: compile without them
    log.warning("this XLA does not take the CPU compiler options %s (%s); compiling without",
                CPU_OPTIONS, str(e).splitlines()[0][:200])
    return False
