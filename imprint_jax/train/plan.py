"""`imprint-jax plan` for a training config: the run's state and step, built abstractly and
compiled ahead of time for a mesh of virtual CPU devices or a TPU topology.

The generic half (what a plan holds, TPU topologies and their HBM, what a compiled step
reports, the printed table) is `imprint_jax.parallel.plan`; this module re-exports the names
the command uses, so that it needs this one module.
"""

from __future__ import annotations

import copy
import time

import ml_collections

from imprint_jax.parallel import plan as parallel_plan
from imprint_jax.parallel import sharding
from imprint_jax.parallel.plan import Plan, hbm_gib, print_plan, topology_devices
from imprint_jax.train import setup as setup_lib
from imprint_jax.train.loop import compile_steps

__all__ = ["Plan", "hbm_gib", "plan", "print_plan", "topology_devices"]


def plan(config: ml_collections.ConfigDict, mesh: dict[str, int], devices=None) -> Plan:
  """Compiles the config's training step for `mesh` on `devices` (default: all of JAX's).
  Nothing is allocated: no checkpoint is read, the encoder may be random."""
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
  t0 = time.time()
  compiled, _ = compile_steps(s)
  compile_s = time.time() - t0
  temp, flops = parallel_plan.compiled_costs(compiled)
  return Plan(mesh=parallel_plan.mesh_sizes(s.mesh), global_batch=c.train.global_batch,
              params_total=parallel_plan.count(setup_lib.full_model_state(st)),
              trainable_total=parallel_plan.count(st.params), params_bytes=params_bytes,
              opt_bytes=opt_bytes,
              batch_bytes=parallel_plan.batch_bytes(s.batch_spec(c.train.global_batch)),
              temp_bytes=temp, flops=flops, compile_s=compile_s,
              target=parallel_plan.target(s.mesh))
