"""Memory plans: per-device memory and FLOPs of a step compiled ahead of time for a mesh.

What a plan holds (`Plan`), the HBM of TPU devices, the devices of a TPU topology, what a
compiled step reports (`compiled_costs`) and the table `imprint-jax plan` prints. Building a
training run's state and step is training's half: `imprint_jax.train.plan`.

The state is built abstractly (`nnx.eval_shape`), the step lowered with ShapeDtypeStructs and
compiled for the requested mesh: nothing is allocated. Parameter and optimizer bytes per
device follow exactly from the shardings; activations are XLA's temporary buffers for the
step. Two targets:
  * virtual CPU devices (default): the CPU compiler's schedule, an upper estimate. It does not
    schedule for memory (e.g. it may keep every gathered weight and every full-size gradient
    alive at once), and the model traces its CPU forms of attention, GroupNorm and convs;
  * a TPU topology (`topology_devices`, e.g. 'v5e:4x4'): the TPU compiler itself, run on this
    host through libtpu with no TPU attached, tracing the model's TPU forms. This is what the
    same step needs on that slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from jax.experimental import topologies
from jax.sharding import Mesh

from imprint_jax.errors import UserError
from imprint_jax.parallel import sharding

GIB = 2**30


@dataclasses.dataclass
class Plan:
  mesh: dict[str, int]
  global_batch: int
  params_total: int          # parameters (all components), count
  trainable_total: int       # trained parameters, count
  params_bytes: int          # per device
  opt_bytes: int             # per device
  batch_bytes: int           # per device
  temp_bytes: int | None     # per device: activations and other temporaries
  flops: float | None        # per device per step, from XLA's cost analysis
  compile_s: float
  target: str = ""           # what the step was compiled for, e.g. 'TPU v5 lite'

  @property
  def total_bytes(self) -> int:
    return self.params_bytes + self.opt_bytes + self.batch_bytes + (self.temp_bytes or 0)


# HBM per device in GiB by `device_kind`, for slices whose devices are whole chips (v5e and
# v6e have one TensorCore per chip, v5p's two act as one megacore device). Others (v4's
# topology descriptions list each core) need --hbm-gib.
HBM_GIB = {"TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v6 lite": 32.0}


def topology_devices(name: str) -> list:
  """The devices of TPU slice `name` ('v5e:4x4', 'v5p:4x4x4', ...) for ahead-of-time
  compilation from a host without TPUs (needs libtpu)."""
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # libtpu explains bad names in the first line of its message
    raise UserError(f"TPU topology {name!r}: {str(e).splitlines()[0]}") from None


def hbm_gib(device_kind: str) -> float | None:
  return HBM_GIB.get(device_kind)


def count(tree: Any) -> int:
  """The number of elements of all arrays (or ShapeDtypeStructs) in `tree`."""
  return sum(x.size for x in jax.tree.leaves(tree))


def batch_bytes(batch: Mapping[str, jax.ShapeDtypeStruct]) -> int:
  """Bytes one device holds of a global batch of sharded ShapeDtypeStructs, every element
  counted at 4 bytes (float32)."""
  return sum(v.sharding.shard_shape(v.shape)[0] * v.size // v.shape[0] * 4
             for v in batch.values())


def compiled_costs(compiled: Any) -> tuple[int | None, float | None]:
  """(temporary bytes, FLOPs) per device of a compiled step, from XLA's memory and cost
  analyses; None for what the backend does not report."""
  temp = flops = None
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # noqa: BLE001 - backend without memory analysis
    pass
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) or None
  except Exception:  # noqa: BLE001 - backend without cost analysis
    pass
  return temp, flops


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
  """{'data': D, 'fsdp': F, 'tensor': T} of a mesh."""
  return dict(zip(sharding.MESH_AXES, (mesh.shape[a] for a in sharding.MESH_AXES)))


def target(mesh: Mesh) -> str:
  """What a step for `mesh` is compiled for: 'virtual CPU devices' or the device kind."""
  d = mesh.devices.flat[0]
  return "virtual CPU devices" if d.platform == "cpu" else d.device_kind


def print_plan(p: Plan, hbm_gib: float | None = None) -> bool:
  """Prints the plan as a small table; returns whether it fits in `hbm_gib` (True if None)."""
  mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
  n = 1
  for v in p.mesh.values():
    n *= v
  rows = [
      ("mesh", f"{mesh} ({n} devices), global batch {p.global_batch}"),
      ("compiled for", p.target),
      ("parameters", f"{p.params_total / 1e9:.3f} B ({p.trainable_total / 1e9:.3f} B trained)"),
      ("params / device", f"{p.params_bytes / GIB:8.2f} GiB"),
      ("optimizer / device", f"{p.opt_bytes / GIB:8.2f} GiB"),
      ("batch / device", f"{p.batch_bytes / GIB:8.2f} GiB"),
      ("activations / device", "unavailable" if p.temp_bytes is None
       else f"{p.temp_bytes / GIB:8.2f} GiB (XLA temporaries)"),
      ("total / device", f"{p.total_bytes / GIB:8.2f} GiB"),
  ]
  if p.flops:
    # XLA's cost analysis counts a loop's body once: on CPU devices the attention over long
    # sequences loops over query blocks (attention._blocked_attention), so the figure is low.
    note = " (XLA estimate; CPU attention loops counted once: a lower bound)" if (
        p.target == "virtual CPU devices") else ""
    rows.append(("step FLOPs / device", f"{p.flops / 1e12:.2f} TFLOP{note}"))
  rows.append(("compile time", f"{p.compile_s:.0f} s"))
  fits = True
  if hbm_gib is not None:
    fits = p.total_bytes <= hbm_gib * GIB
    rows.append((f"fits in {hbm_gib:g} GiB", "yes" if fits else "NO"))
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")
  return fits
