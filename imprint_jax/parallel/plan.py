"""`imprint-jax plan`: per-device memory of a training step, compiled ahead of time.

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

import copy
import dataclasses
import time

import jax
import ml_collections

from imprint_jax.errors import UserError
from imprint_jax.train import setup as setup_lib
from imprint_jax.parallel import sharding
from imprint_jax.train.loop import compile_steps

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


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


# HBM per device in GiB by `device_kind`, for slices whose devices are whole chips (v5e and
# v6e have one TensorCore per chip, v5p's two act as one megacore device). Others (v4's
# topology descriptions list each core) need --hbm-gib.
HBM_GIB = {"TPU v5 lite": 16.0, "TPU v5": 95.0, "TPU v6 lite": 32.0}


def topology_devices(name: str) -> list:
  """The devices of TPU slice `name` ('v5e:4x4', 'v5p:4x4x4', ...) for ahead-of-time
  compilation from a host without TPUs (needs libtpu)."""
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
  except Exception as e:  # libtpu explains bad names in the first line of its message
    raise UserError(f"TPU topology {name!r}: {str(e).splitlines()[0]}") from None


def hbm_gib(device_kind: str) -> float | None:
  return HBM_GIB.get(device_kind)


def plan(config: ml_collections.ConfigDict, mesh: dict[str, int], devices=None) -> Plan:
  """Compiles the config's training step for `mesh` on `devices` (default: all of JAX's)."""
  c = copy.deepcopy(config)
  c.mesh = ml_collections.ConfigDict(mesh)
  c.init.checkpoint = ""
  c.init.encoder_from = ""
  c.allow_random_encoder = True
  s = setup_lib.build(c, total_steps=10_000, steps_per_epoch=1_000, devices=devices)
  st, sh = s.abstract_state, s.state_shardings
  params_bytes = sharding.bytes_per_device(setup_lib.full_model_state(st),
                                           setup_lib.full_model_state(sh))
  opt_bytes = sharding.bytes_per_device(st.opt_state, sh.opt_state)
  batch = s.batch_spec(c.train.global_batch)
  batch_bytes = sum(v.sharding.shard_shape(v.shape)[0] * v.size // v.shape[0] * 4
                    for v in batch.values())
  t0 = time.time()
  compiled, _ = compile_steps(s)
  compile_s = time.time() - t0
  temp = flops = None
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # backend without memory analysis
    pass
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) or None
  except Exception:
    pass
  return Plan(mesh=dict(zip(sharding.MESH_AXES, (s.mesh.shape[a] for a in sharding.MESH_AXES))),
              global_batch=c.train.global_batch,
              params_total=_count(setup_lib.full_model_state(st)),
              trainable_total=_count(st.params), params_bytes=params_bytes,
              opt_bytes=opt_bytes, batch_bytes=batch_bytes, temp_bytes=temp, flops=flops,
              compile_s=compile_s, target=_target(s.mesh))


def _target(mesh) -> str:
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
    # sequences loops over query blocks (layers._blocked_attention), so the figure is low.
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
