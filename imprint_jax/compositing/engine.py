"""The device side of compositing: a stage-2 model placed on the local devices and the compiled
program that turns a batch of prepared jobs into generated crops.

One program call = `diffusion.generate.composite_latents` (classifier-free guidance,
background latent blending at every step) + VAE decode for every row of a batch, the rows split
over all devices. The noise of sample k of a job is drawn from fold_in(PRNGKey(seed), k) alone,
so a row's result does not depend on the other rows of its batch (or given: `latents=`).

Compute dtype: bfloat16 on GPU/TPU, float32 on CPU. Parameters (`placement`): float32 as stored
or cast once to bfloat16; a full copy on every device, or split over them (fsdp-style).

Caches: programs are jitted once per (model architecture, mesh, steps, sampler, prediction
type, guidance on/off, given latents, parameter placement), process-wide, so a second
`Engine` of the same architecture (e.g. the CLI's, loaded from a checkpoint) reuses the first
one's; jax.jit caches per batch shape inside. Each trace of the program is visible as a
`jax.monitoring` event "/jax/core/compile/jaxpr_trace_duration" with fun_name
`composite_batch` (the tests count retraces with it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from imprint_jax.compositing import placement
from imprint_jax.compositing.jobs import DEFAULT_ENCODER_SIZE, DEFAULT_GENERATOR_SIZE, Prepared
from imprint_jax.diffusion import generate
from imprint_jax.errors import UserError
from imprint_jax.models.imprint import Imprint, ImprintConfig
from imprint_jax.parallel import cpu_runtime
from imprint_jax.parallel import compiler, sharding

DEFAULT_BATCH_SIZE = 8

_PROGRAMS: dict[tuple, Any] = {}


def auto_dtype() -> str:
  """bfloat16 on accelerators, float32 on CPU (where bfloat16 is slow and less exact)."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def check_stage2(model: Imprint) -> None:
  """UserError unless `model` is a stage-2 Imprint (a 9-channel UNet)."""
  if not isinstance(model, Imprint):
    raise UserError(f"expected an imprint_jax Imprint model, got {type(model).__name__}")
  if model.cfg.stage != 2:
    raise UserError(f"a stage-{model.cfg.stage} model (UNet with"
                    f" {model.cfg.unet.in_channels} input channels); compositing needs a"
                    " stage-2 model (9 input channels)")


def program(graphdef, mesh: Mesh, num_steps: int, sampler: str, prediction_type: str,
            use_cfg: bool, given_latents: bool = False, state_shardings: Any = None):
  """The jitted batch function for one static setting (cached; jax.jit caches per shape).

  `(state, object_BEE3, target_BGG3, mask_BGG1, seeds_B, sample_B, guidance, latents)
  -> (B, G, G, 3) uint8`. `state_shardings`: the parameters' placement (a pure dict of
  NamedShardings, a function of graphdef and mesh: `placement.param_shardings`); None:
  replicated."""
  key = (graphdef, mesh, num_steps, sampler, prediction_type, use_cfg, given_latents,
         state_shardings is not None)
  if key in _PROGRAMS:
    return _PROGRAMS[key]
  rows = sharding.batch_sharding(mesh)
  repl = NamedSharding(mesh, P())
  state_in = repl if state_shardings is None else state_shardings

  def composite_batch(state, object_BEE3, target_BGG3, mask_BGG1, seeds_B, sample_B, guidance,
                      latents):
    model = nnx.merge(graphdef, state)
    keys_B2 = jax.vmap(lambda s, k: jax.random.fold_in(jax.random.PRNGKey(s), k))(
        seeds_B, sample_B)
    z = generate.composite_latents(
        model, object_BEE3, target_BGG3, mask_BGG1, keys_B2, num_steps=num_steps,
        guidance=guidance if use_cfg else 1.0, sampler=sampler,
        prediction_type=prediction_type, blend=True,
        x_T=latents if given_latents else None)
    x = generate.decode_latent(model, z)
    return jnp.floor((x + 1.0) * 127.5 + 0.5).astype(jnp.uint8)

  target = mesh.devices.flat[0].platform
  cpu_runtime.on_platform(target)
  fn = jax.jit(composite_batch,
               in_shardings=(state_in, rows, rows, rows, rows, rows, repl,
                             rows if given_latents else repl),
               out_shardings=rows, compiler_options=compiler.compiler_options(target))
  _PROGRAMS[key] = fn
  return fn


@dataclasses.dataclass
class Pending:
  """A dispatched device batch; `result()` waits for it: (n, G, G, 3) uint8."""
  out: jax.Array
  n: int

  def result(self) -> np.ndarray:
    return np.asarray(jax.device_get(self.out))[:self.n]


class Engine:
  """A stage-2 model's parameters placed on the local devices, and its batch program.

  `submit` dispatches one batch of (prepared job, sample index) rows; the parameters stay on
  the devices between calls and the program is reused for every batch of the same shape.
  """

  def __init__(self, model: Imprint, *, prediction_type: str = "epsilon",
               dtype: str | None = None, devices: Sequence[jax.Device] | None = None,
               param_dtype: str | None = None, shard_params: str = "auto"):
    """Args:
      model: a stage-2 `Imprint` (9-channel UNet).
      prediction_type: the UNet's output, 'epsilon' or 'v_prediction'.
      dtype: compute dtype; None: bfloat16 on GPU/TPU, float32 on CPU.
      devices: the devices the batch is split over (default: all local devices).
      param_dtype: 'float32' or 'bfloat16': the parameters are cast to it once, here (None:
        as given; checkpoints hold float32). bfloat16 halves their memory.
      shard_params: 'never' (a full copy on every device), 'always' (each large weight split
        over the devices, fsdp-style: `placement.param_shardings`), or 'auto' (split when the
        parameters take more than half of one device's memory; never on CPU).
    """
    check_stage2(model)
    self.prediction_type = prediction_type
    self.dtype = dtype or auto_dtype()
    # Remat policies only matter under a gradient: inference runs without them.
    cfg = model.cfg.with_dtype(self.dtype, remat="none")
    graphdef, state = nnx.split(model)
    if cfg != model.cfg:
      graphdef = placement.graphdef_for(cfg)
    self.graphdef = graphdef
    devices = list(devices or jax.local_devices())
    self.param_dtype = placement.check_param_dtype(param_dtype)
    self.sharded = placement.shard_decision(
        shard_params, placement.state_bytes(state, self.param_dtype), devices)
    self.mesh = placement.inference_mesh(devices, self.sharded)
    # plain dicts: JAX flattens them in C++ on every call (nnx.Variables: one Python call each)
    self.state_shardings = (placement.param_shardings(cfg, self.mesh) if self.sharded
                            else None)
    self.state = placement.place_params(nnx.to_pure_dict(state), self.mesh,
                                        self.state_shardings, self.param_dtype)

  @property
  def param_bytes(self) -> int:
    """Bytes of parameters that one device holds."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(self.state))

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def batch_rows(self, batch_size: int | None, rows: int) -> int:
    """Rows per device call: min(batch_size, rows) rounded up to a multiple of the devices."""
    b = max(1, min(batch_size or DEFAULT_BATCH_SIZE, rows))
    return -(-b // self.num_devices) * self.num_devices

  def submit(self, rows: Sequence[tuple[Prepared, int]], *, batch: int, steps: int,
             guidance: float, sampler: str, latents: np.ndarray | None = None) -> Pending:
    """Dispatches one device batch of (job, sample index) rows, padded to `batch` rows
    (a multiple of the device count); returns at once (JAX dispatch is asynchronous).
    `latents`: optional initial noise, (len(rows), h, w, C) float32, instead of the seeds'."""
    if not rows or len(rows) > batch or batch % self.num_devices:
      raise ValueError(f"{len(rows)} rows for a batch of {batch} on {self.num_devices} devices")
    padded = list(rows) + [rows[-1]] * (batch - len(rows))
    fn = program(self.graphdef, self.mesh, int(steps), sampler, self.prediction_type,
                 guidance != 1, latents is not None, self.state_shardings)
    if latents is not None:
      latents = np.concatenate([latents, np.repeat(latents[-1:], batch - len(rows), 0)])
    # Placed here, not by jit: with several processes jit takes no numpy array to split.
    rows_on = sharding.batch_sharding(self.mesh)
    repl = NamedSharding(self.mesh, P())
    put = lambda a: jax.device_put(a, rows_on)  # noqa: E731
    out = fn(self.state,
             put(np.stack([p.object_in for p, _ in padded])),
             put(np.stack([p.target_in for p, _ in padded])),
             put(np.stack([p.mask_in for p, _ in padded])),
             put(np.array([p.seed for p, _ in padded], np.uint32)),
             put(np.array([k for _, k in padded], np.uint32)),
             jax.device_put(np.float32(guidance), repl),
             jax.device_put(np.zeros((), np.float32), repl) if latents is None
             else put(latents))
    return Pending(out, len(rows))


def sampler_memory(cfg: ImprintConfig, batch: int, *, param_dtype: str | None = None,
                   dtype: str = "bfloat16", shard_params: str = "never",
                   devices: Sequence[jax.Device] | None = None,
                   encoder_size: int = DEFAULT_ENCODER_SIZE,
                   generator_size: int = DEFAULT_GENERATOR_SIZE, steps: int = 50,
                   guidance: float = 5.0, sampler: str = "ddim") -> dict[str, Any]:
  """Per-device memory of the engine's compiled batch program (sampler + VAE decode) for
  `batch` rows of `cfg`, compiled from abstract inputs: nothing is allocated, so the real
  model can be planned on any host (like `imprint-jax plan` for training).

  Returns bytes per device: 'params' (the parameters, exact from their shardings),
  'arguments' (params + the batch's inputs), 'outputs', 'temporaries' (XLA's buffers for the
  activations) and 'peak' = arguments + outputs + temporaries - aliased; plus 'devices',
  'rows' (the batch rounded up to the devices) and 'sharded'. The figures are those of the
  compiler for `devices` (on CPU: the CPU compiler's schedule and the model's CPU forms).
  """
  cfg = cfg.with_dtype(dtype, remat="none")
  devices = list(devices or jax.local_devices())
  param_dtype = placement.check_param_dtype(param_dtype)
  params = nnx.to_pure_dict(placement.abstract_params(cfg))
  sharded = placement.shard_decision(shard_params, placement.state_bytes(params, param_dtype),
                                     devices)
  mesh = placement.inference_mesh(devices, sharded)
  shardings = placement.param_shardings(cfg, mesh) if sharded else None
  place = shardings or jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
      x.shape, placement.cast_dtype(x, param_dtype), sharding=s), params, place)
  n = len(devices)
  b = -(-max(1, batch) // n) * n
  rows = sharding.batch_sharding(mesh)
  E, G = encoder_size, generator_size

  def arg(shape, dt=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dt, sharding=rows)

  fn = program(placement.graphdef_for(cfg), mesh, steps, sampler, "epsilon", guidance != 1,
               state_shardings=shardings)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = fn.lower(abstract, arg((b, E, E, 3)), arg((b, G, G, 3)), arg((b, G, G, 1)),
                      arg((b,), jnp.uint32), arg((b,), jnp.uint32), scalar, scalar).compile()
  m = compiled.memory_analysis()
  param_bytes = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(place)))
  out = {"devices": n, "rows": b, "sharded": sharded, "params": param_bytes,
         "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes}
  out["peak"] = (out["arguments"] + out["outputs"] + out["temporaries"]
                 - m.alias_size_in_bytes)
  return out
