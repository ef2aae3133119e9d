"""Device mesh and logical-axis sharding.

The mesh always has the axes ('data', 'fsdp', 'tensor'). Batches are split over data x fsdp;
parameters and optimizer state are split by the logical-axis rules of the config, e.g.

    rules = [("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("conv_out", "tensor"),
             ("conv_in", "fsdp"), ("cross", None), ("norm", None), ("time", None)]

A logical axis maps to one mesh axis, a tuple of them, or None (replicated). A tensor dimension
that the mapped mesh axes do not divide is replicated instead (e.g. the 4 input channels of a
UNet's conv_in on fsdp=8), so any model fits any mesh; `plan` reports how much ends up
replicated.

The models name logical axes only, and this module maps them to mesh axes: on parameters
(their `out_sharding` metadata, mapped by `tree_shardings`) and on activations, which the
models constrain with `shard_batch` and split with `activation_axes` ('batch', or a rule's
logical axis such as 'heads') while traced under `jax.set_mesh`. Activations follow the rules
set by `logical_rules` (default: those of configs/common.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imprint_jax.configs.common import LOGICAL_AXIS_RULES
from imprint_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXES = ("embed", "heads", "mlp", "cross", "conv_in", "conv_out", "norm", "time")


def mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves {'data': D, 'fsdp': F, 'tensor': T} with at most one -1 (= fill) to sizes."""
  unknown = set(spec) - set(MESH_AXES)
  if unknown:
    raise UserError(f"unknown mesh axis {sorted(unknown)[0]!r}: the axes are {MESH_AXES}")
  sizes = [int(spec.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise UserError(f"mesh {dict(spec)}: at most one axis may be -1 (fill)")
  if any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh {dict(spec)}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise UserError(f"mesh {dict(spec)} does not divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices,"
                    f" but there are {num_devices}")
  return tuple(sizes)


def make_mesh(spec: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over all devices (or `devices`) with the axes data, fsdp, tensor."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def check_rules(rules: Sequence[tuple[str, Any]]) -> list[tuple[str, tuple[str, ...]]]:
  """Validates logical-axis rules; returns them with mesh axes as tuples."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise UserError(f"logical axis rule {rule!r} is not a (logical, mesh) pair")
    logical, mesh_axes = rule
    if logical not in LOGICAL_AXES:
      raise UserError(f"logical axis rule names unknown axis {logical!r}; the model's axes are"
                      f" {LOGICAL_AXES}")
    if mesh_axes is None:
      mesh_axes = ()
    elif isinstance(mesh_axes, str):
      mesh_axes = (mesh_axes,)
    for a in mesh_axes:
      if a not in MESH_AXES:
        raise UserError(f"logical axis rule {rule!r} names unknown mesh axis {a!r}")
    out.append((logical, tuple(mesh_axes)))
  return out


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    rules: Sequence[tuple[str, tuple[str, ...]]], mesh: Mesh) -> P:
  """PartitionSpec for a tensor with logical axis `names`; mesh axes used at most once."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for every leaf of an (abstract) state: Variables with logical axis names
  follow the rules, everything else (step counters, optimizer scalars) is replicated."""
  rules = check_rules(rules)

  def one(x):
    if isinstance(x, nnx.Variable):
      if not hasattr(x.get_value(), "shape"):
        return x  # e.g. optax.MaskedNode: a placeholder without leaves
      names = x.get_metadata().get("out_sharding")
      shape = x.shape
      spec = logical_to_spec(names, shape, rules, mesh) if names else P()
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVATION_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "activation_rules", default=None)


@contextlib.contextmanager
def logical_rules(rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Traces model code with activations split by `rules` (see `activation_axes`) instead of
  the default rules of configs/common.py. Like `jax.set_mesh`, it applies while tracing."""
  token = _ACTIVATION_RULES.set(tuple(check_rules(rules)))
  try:
    yield
  finally:
    _ACTIVATION_RULES.reset(token)


def activation_axes(name: str, dim: int, *, exclude: Sequence[str] = ()) -> tuple[str, ...]:
  """The axes of the ambient mesh (`jax.set_mesh`) that split an activation dimension of size
  `dim` with logical axis `name`: for 'batch' the batch axes, otherwise the mesh axes the rules
  in effect map `name` to (`logical_rules`). Only axes of size > 1 not in `exclude`, and only
  when together they divide `dim`; () when there is no mesh or nothing is split."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  if name == "batch":
    wanted = BATCH_AXES
  else:
    rules = _ACTIVATION_RULES.get()
    wanted = dict(check_rules(LOGICAL_AXIS_RULES) if rules is None else rules).get(name, ())
  axes = tuple(a for a in wanted
               if a in mesh.axis_names and mesh.shape[a] > 1 and a not in exclude)
  return axes if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def spec_entry(axes: Sequence[str]) -> str | tuple[str, ...] | None:
  """One PartitionSpec entry for mesh axes: None, a name, or a tuple of names."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def shard_batch(x: jax.Array) -> jax.Array:
  """Constrains an activation to be split over the batch axes of the ambient mesh and
  replicated along its other dimensions; a no-op outside `jax.set_mesh` or when the batch
  does not divide.

  The models call it at block boundaries and on the inputs of every convolution and dense
  layer, except row-parallel dense layers (a ('heads'|'mlp', 'embed') kernel: attention output
  and MLP output layers), whose outputs it constrains instead. Besides documenting the
  intended layout, it stops the SPMD partitioner from choosing layouts that mix batch, fsdp and
  tensor sharding: without it, XLA (0.10.2, CPU; Shardy and GSPMD alike) computed a wrong UNet
  forward and wrong gradients on a data=2 x fsdp=2 x tensor=2 mesh. The known case: `x @ w`
  with x sharded P(('data', 'fsdp'), None, 'tensor'), w P('tensor', 'fsdp') (a ('heads'|'mlp',
  'embed') kernel) and the result P(('data', 'fsdp'), None, 'tensor') is partitioned with a
  collective-permute of x that swaps batch shards 1 and 2 and is never undone, so those
  samples get each other's output. Constraining the result to P(('data', 'fsdp')) (features
  replicated, the usual tensor-parallel all-reduce) avoids that partitioning. The backward
  passes of column-parallel dense layers (dx = dy @ w.T) and of convolutions (kernels split
  over fsdp on input and tensor on output channels) are the same product; constraining the
  layer's input constrains dx. tests/test_train.py checks the sharded step and the sharded
  UNet forward and gradients; tests/test_layers.py the product itself.
  """
  if not hasattr(x, "shape") or x.ndim == 0:
    return x
  axes = activation_axes("batch", x.shape[0])
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, P(spec_entry(axes)))


def values(tree: Any) -> Any:
  """`tree` with each nnx.State as plain nested dicts and each nnx.Variable as its value."""
  def one(x):
    if isinstance(x, nnx.State):
      return nnx.to_pure_dict(x)
    return x.get_value() if isinstance(x, nnx.Variable) else x

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, (nnx.State, nnx.Variable)))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(global_batch: int, mesh: Mesh) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n:
    raise UserError(f"global batch {global_batch} is not divisible by data x fsdp = {n}")
  if global_batch % jax.process_count():
    raise UserError(f"global batch {global_batch} is not divisible by the"
                    f" {jax.process_count()} processes")


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (abstract arrays) under `shardings`."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = s.shard_shape(x.shape)
    total += math.prod(shard) * np.dtype(x.dtype).itemsize
  return total
