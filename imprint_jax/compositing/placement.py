"""Where a compositing model's parameters live: their dtype and their placement on the devices.

Parameters are float32 as stored, or cast once at load to `param_dtype='bfloat16'` (half the
memory); a full copy on every device, or split over the devices (`shard_params`, fsdp-style,
for a model that does not fit one device: each large weight split along one logical axis and
gathered where it is used, the batch still split over all devices). A checkpoint is restored
straight into its final dtype and placement (`load_placed`), never as a float32 copy on one
device first.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imprint_jax.configs.common import LOGICAL_AXIS_RULES
from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.errors import UserError
from imprint_jax.models import layers
from imprint_jax.models.imprint import Imprint, ImprintConfig
from imprint_jax.parallel import sharding

PARAM_DTYPES = ("float32", "bfloat16")
SHARD_MODES = ("auto", "always", "never")
# shard_params='auto' splits the parameters when they would take more than this share of one
# device's memory (the rest is left for the activations of the sampler, guidance doubling them).
AUTO_SHARD_FRACTION = 0.5


def check_param_dtype(param_dtype: str | None) -> str | None:
  """`param_dtype` if it is None or one of PARAM_DTYPES, else UserError."""
  if param_dtype is not None and param_dtype not in PARAM_DTYPES:
    raise UserError(f"param dtype {param_dtype!r}: expected one of {', '.join(PARAM_DTYPES)}")
  return param_dtype


def cast_dtype(x: Any, param_dtype: str | None):
  """The dtype a parameter is stored in: `param_dtype` for floating ones, else its own."""
  if param_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.dtype(param_dtype)
  return jnp.dtype(x.dtype)


def state_bytes(state: Any, param_dtype: str | None = None) -> int:
  """Bytes of a (possibly abstract) parameter tree once cast to `param_dtype`."""
  return sum(math.prod(x.shape) * cast_dtype(x, param_dtype).itemsize
             for x in jax.tree.leaves(state))


def device_memory(device: jax.Device) -> int | None:
  """Bytes of memory a device offers to JAX (None where unknown, e.g. on CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # backends without memory statistics
    return None
  return (stats or {}).get("bytes_limit")


def shard_decision(mode: str, nbytes: int, devices: Sequence[jax.Device]) -> bool:
  """Whether parameters of `nbytes` are split over `devices` under `shard_params=mode`."""
  if mode not in SHARD_MODES:
    raise UserError(f"shard params {mode!r}: expected one of {', '.join(SHARD_MODES)}")
  if mode == "never" or len(devices) < 2:
    return False
  if mode == "always":
    return True
  limit = device_memory(devices[0])
  return limit is not None and nbytes > AUTO_SHARD_FRACTION * limit


def inference_mesh(devices: Sequence[jax.Device], sharded: bool) -> Mesh:
  """The mesh (data, fsdp, tensor) of `devices`: all on 'data' when every device holds all
  parameters, all on 'fsdp' when they are split. Batch rows are split over data x fsdp, i.e.
  over every device, either way."""
  grid = np.array(list(devices), dtype=object)
  shape = (1, grid.size, 1) if sharded else (grid.size, 1, 1)
  return Mesh(grid.reshape(shape), sharding.MESH_AXES)


def inference_rules() -> tuple[tuple[str, str | None], ...]:
  """The training configs' logical-axis rules with every split put on 'fsdp', the one mesh
  axis of sharded inference: each weight is split along its first logical axis that training
  splits at all (embed, heads, mlp, conv_in or conv_out) and that the device count divides,
  and gathered where it is used; norms, biases and the cross-attention inputs stay whole."""
  return tuple((name, "fsdp" if axes else None) for name, axes in LOGICAL_AXIS_RULES)


_GRAPHDEFS: dict[ImprintConfig, Any] = {}
_SHARDINGS: dict[tuple, Any] = {}


def graphdef_for(cfg: ImprintConfig):
  """The graph definition of `Imprint(cfg)` (cached; built abstractly, no weights)."""
  if cfg not in _GRAPHDEFS:
    abstract = nnx.eval_shape(lambda: Imprint(cfg, rngs=layers.init_rngs(0)))
    _GRAPHDEFS[cfg] = nnx.split(abstract)[0]
  return _GRAPHDEFS[cfg]


def abstract_params(cfg: ImprintConfig) -> nnx.State:
  """The parameters of `Imprint(cfg)` as shapes and dtypes (nothing allocated)."""
  return nnx.state(nnx.eval_shape(lambda: Imprint(cfg, rngs=layers.init_rngs(0))), nnx.Param)


def param_shardings(cfg: ImprintConfig, mesh: Mesh) -> Any:
  """NamedShardings (a pure dict, like `Engine.state`) of the split parameters."""
  key = (cfg, mesh)
  if key not in _SHARDINGS:
    tree = sharding.tree_shardings(abstract_params(cfg), mesh, inference_rules())
    _SHARDINGS[key] = nnx.to_pure_dict(tree)
  return _SHARDINGS[key]


def place_params(params: Any, mesh: Mesh, shardings: Any | None,
                 param_dtype: str | None) -> Any:
  """A pure dict of parameters cast to `param_dtype` (one array at a time, where it lies) and
  placed by `shardings` (None: a full copy on every device of `mesh`)."""
  repl = NamedSharding(mesh, P())
  if shardings is None:
    shardings = jax.tree.map(lambda _: repl, params)

  def one(x, s):
    dtype = cast_dtype(x, param_dtype)
    if x.dtype != dtype:
      x = x.astype(dtype)
    return jax.device_put(x, s)

  return jax.tree.map(one, params, shardings)


def load_placed(path: str | os.PathLike, *, dtype: str, devices: Sequence[jax.Device] | None,
                param_dtype: str | None, shard_params: str) -> tuple[Imprint, dict[str, Any]]:
  """A stage-2 checkpoint's model with its parameters restored as `param_dtype` directly
  into the placement `Engine` gives them (so a model that does not fit one device never
  lands on one), and its metadata."""
  ckpt = ckpt_lib.resolve(path)
  meta = ckpt_lib.read_meta(ckpt)
  cfg = ImprintConfig.from_dict(meta["model"])
  if cfg.stage != 2:
    raise UserError(f"{ckpt}: a stage-{cfg.stage} checkpoint (UNet with"
                    f" {cfg.unet.in_channels} input channels); this needs stage 2")
  cfg = cfg.with_dtype(dtype, remat="none")
  param_dtype = check_param_dtype(param_dtype)
  devices = list(devices or jax.local_devices())
  abstract = nnx.eval_shape(lambda: Imprint(cfg, rngs=layers.init_rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  sharded = shard_decision(shard_params, state_bytes(params, param_dtype), devices)
  mesh = inference_mesh(devices, sharded)
  rules = inference_rules() if sharded else [(name, None) for name, _ in inference_rules()]
  shardings = sharding.tree_shardings(params, mesh, rules)
  # The restore target's dtype is what orbax reads the stored float32 arrays as.
  nnx.update(abstract, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, cast_dtype(x, param_dtype)), params))
  state = ckpt_lib.restore_model_state(ckpt, abstract, shardings)
  graphdef, _ = nnx.split(abstract, nnx.Param)
  return nnx.merge(graphdef, state), meta
