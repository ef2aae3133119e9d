"""From a run config to a sharded, ready-to-step training state (no data, no loop).

Everything here can run abstractly: `plan` uses the same functions with `nnx.eval_shape`
models and never allocates the parameters.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.data import latent_store, token_store
from imprint_jax.errors import UserError
from imprint_jax.models import layers
from imprint_jax.models.adapter import AdapterConfig
from imprint_jax.models.dinov2 import Dinov2Config
from imprint_jax.models.dinov2 import num_tokens as dinov2_num_tokens
from imprint_jax.models.imprint import Imprint, ImprintConfig, vae_factor
from imprint_jax.models.unet import UNetConfig, widen_conv_in
from imprint_jax.models.vae import VAEConfig
from imprint_jax.train import optim
from imprint_jax.parallel import sharding
from imprint_jax.train.steps import StepConfig, TrainState, merge_parts

# What the step needs from a batch (the pipeline also yields ids kept on the host).
MODEL_KEYS = {1: ("object", "target"), 2: ("object", "target", "mask", "masked_target")}


def uses_object_tokens(c: ml_collections.ConfigDict) -> bool:
  """Stage 2 reading precomputed DINOv2 tokens (`data.object_tokens`) instead of running it."""
  return c.stage == 2 and bool(c.data.get("object_tokens", ""))


def uses_latents(c: ml_collections.ConfigDict) -> bool:
  """Stage 2 reading precomputed VAE posteriors (`data.latents`) instead of running the VAE
  encoder."""
  return c.stage == 2 and bool(c.data.get("latents", ""))


# With `data.latents`, what replaces each pixel input of the stage-2 step.
LATENT_KEYS = {"target": "target_moments", "masked_target": "masked_target_moments",
               "mask": "mask_latent"}


def model_keys(c: ml_collections.ConfigDict) -> tuple[str, ...]:
  keys = MODEL_KEYS[c.stage]
  if uses_object_tokens(c):
    keys = ("object_tokens",) + keys[1:]
  if uses_latents(c):
    keys = tuple(LATENT_KEYS.get(k, k) for k in keys)
  return keys


def _sub_config(klass, spec: Mapping[str, Any], **defaults) -> Any:
  spec = dict(spec)
  preset = spec.pop("preset", None)
  if preset is not None:
    if klass is Dinov2Config:
      base = Dinov2Config.preset(preset, registers=spec.pop("registers", 0))
    elif klass is UNetConfig:
      if preset not in ("sd15", "sd21"):
        raise UserError(f"unknown UNet preset {preset!r}: expected sd15 or sd21")
      base = getattr(UNetConfig, preset)()
    elif klass is VAEConfig:
      if preset != "sd":
        raise UserError(f"unknown VAE preset {preset!r}: expected sd")
      base = VAEConfig.sd()
    else:
      raise UserError(f"{klass.__name__} has no presets")
  else:
    base = None
  fields = {f.name for f in dataclasses.fields(klass)}
  unknown = sorted(set(spec) - fields)
  if unknown:
    raise UserError(f"model.{klass.__name__}: unknown field {unknown[0]!r}")
  spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
  if base is not None:
    return dataclasses.replace(base, **spec)
  return klass(**{**defaults, **spec})


def model_config(c: ml_collections.ConfigDict) -> ImprintConfig:
  """The ImprintConfig of a run config (presets plus overrides), with its dtype and remat."""
  m = c.model
  dinov2 = _sub_config(Dinov2Config, m.dinov2)
  unet = _sub_config(UNetConfig, m.unet)
  vae = _sub_config(VAEConfig, m.vae)
  adapter = _sub_config(AdapterConfig, {"in_dim": dinov2.hidden_size,
                                        "out_dim": unet.cross_attention_dim, **m.adapter})
  cfg = ImprintConfig(dinov2=dinov2, adapter=adapter, unet=unet, vae=vae)
  if cfg.stage != c.stage:
    raise UserError(f"config stage {c.stage} but the UNet has {unet.in_channels} input channels")
  return cfg.with_dtype(c.dtype, layers.remat_policy_check(c.remat))


def step_config(c: ml_collections.ConfigDict, mesh: Mesh) -> StepConfig:
  if c.train.prediction_type not in ("epsilon", "v_prediction"):
    raise UserError(f"train.prediction_type {c.train.prediction_type!r}: expected epsilon or"
                    " v_prediction")
  if not 0 <= c.train.embed_dropout < 1:
    raise UserError(f"train.embed_dropout {c.train.embed_dropout} must be in [0, 1)")
  m = c.train.get("microbatches", 1)
  if not isinstance(m, int) or m < 1:
    raise UserError(f"train.microbatches {m!r}: expected a positive integer")
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if c.train.global_batch % (m * n):
    raise UserError(f"global batch {c.train.global_batch} does not split into"
                    f" train.microbatches={m} microbatches over data x fsdp = {n} devices"
                    f" (it must be divisible by {m * n})")
  return StepConfig(embed_dropout=float(c.train.embed_dropout),
                    prediction_type=c.train.prediction_type, microbatches=m)


def phase_boundaries(c: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
  """Phase boundaries in steps, from `phases.steps` or `phases.epochs` x steps per epoch."""
  steps = tuple(c.phases.get("steps", ()))
  if steps:
    return [int(s) for s in steps]
  return [int(e * steps_per_epoch) for e in c.phases.get("epochs", ())]


def check_phases(c: ml_collections.ConfigDict, boundaries: list[int], total_steps: int) -> str:
  """Refuses (one line) phase boundaries that leave a phase without a single step, unless
  `phases.allow_cut`; returns the line `train` logs at start.

  A boundary b means updates 0..b-1 use the previous phase's rates and b.. the next one's
  (`optim.Schedule.fn`), so every phase runs only if 0 < b_1 < ... < b_n < total_steps. A run
  shortened by `train.num_steps` that ends before stage 2's swap would otherwise silently
  never train its second phase."""
  if not boundaries:
    return f"one phase: {total_steps} steps"
  where = (f"phases.steps={tuple(c.phases.steps)}" if tuple(c.phases.get("steps", ()))
           else f"phases.epochs={tuple(c.phases.get('epochs', ()))}")
  spans = [0, *boundaries, total_steps]
  n = len(spans) - 1
  # Metrics step s is update s - 1: phase i runs steps spans[i] + 1 .. spans[i + 1].
  parts = [f"phase {i + 1} steps {spans[i] + 1}-{spans[i + 1]}" for i in range(n)]
  line = f"{n} phases ({where}): {', '.join(parts)}"
  cut = [i for i in range(n) if spans[i + 1] <= spans[i]]
  if not cut:
    return line
  problem = (f"phase {cut[0] + 1} of {n} gets no step: phase boundaries at steps {boundaries}"
             f" ({where}), the run has {total_steps} steps")
  if c.phases.get("allow_cut", False):
    return f"{line}; phases.allow_cut=True: {problem}"
  raise UserError(f"{problem} (stage 2's adapter/UNet learning-rate swap would not happen as"
                  " configured); lengthen the run, move the boundary (phases.steps or"
                  " phases.epochs) or set phases.allow_cut=True")


@dataclasses.dataclass
class Setup:
  """Everything static about a run: model config, mesh, shardings, optimizer, step configs."""
  config: ml_collections.ConfigDict
  model_cfg: ImprintConfig
  mesh: Mesh
  rules: list
  schedules: dict
  tx: Any
  graphdef: Any
  abstract_state: TrainState
  state_shardings: Any
  step_cfg: StepConfig
  total_steps: int
  boundaries: list[int]

  @property
  def stage(self) -> int:
    return self.config.stage

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract global batch (what the step is compiled for)."""
    c, sh = self.config, sharding.batch_sharding(self.mesh)
    E, G = c.data.encoder_size, c.data.generator_size
    d = self.model_cfg.dinov2
    h = G // vae_factor(self.model_cfg.vae)
    moments = (h, h, 2 * self.model_cfg.vae.latent_channels)
    shapes = {"object": (E, E, 3), "target": (G, G, 3), "mask": (G, G, 1),
              "masked_target": (G, G, 3),
              "object_tokens": (dinov2_num_tokens(d, E, E), d.hidden_size),
              "target_moments": moments, "masked_target_moments": moments,
              "mask_latent": (h, h, 1)}
    dtypes = {"object_tokens": token_store.DTYPE, "target_moments": latent_store.DTYPE,
              "masked_target_moments": latent_store.DTYPE}
    return {k: jax.ShapeDtypeStruct((global_batch, *shapes[k]), dtypes.get(k, jnp.float32),
                                    sharding=sh)
            for k in model_keys(c)}


def _check_object_tokens(c: ml_collections.ConfigDict, schedules: dict,
                         model_cfg: ImprintConfig) -> None:
  if c.stage != 2:
    raise UserError("data.object_tokens is a stage-2 option (DINOv2 is trained in stage 1)")
  if schedules.get("dinov2") is not None:
    raise UserError("data.object_tokens needs a frozen DINOv2 (components.dinov2 = None):"
                    " precomputed tokens cannot follow a trained encoder")
  m = token_store.load_manifest(c.data.object_tokens)
  E = c.data.encoder_size
  want = (dinov2_num_tokens(model_cfg.dinov2, E, E), model_cfg.dinov2.hidden_size)
  if m["encoder_size"] != E or m["shape"][1:] != want:
    raise UserError(f"data.object_tokens {c.data.object_tokens}: encoded at {m['encoder_size']}"
                    f" px as {m['shape'][1]} x {m['shape'][2]} tokens, the run needs"
                    f" {E} px, {want[0]} x {want[1]}; rerun `imprint-jax encode-objects`")


def _check_latents(c: ml_collections.ConfigDict, model_cfg: ImprintConfig) -> None:
  """`data.latents` must be of the run's size and hold every mask level it draws (the VAE
  itself is checked once its weights are loaded: `encode_objects.check_vae`)."""
  if c.stage != 2:
    raise UserError("data.latents is a stage-2 option")
  m = latent_store.load_manifest(c.data.latents)
  G = c.data.generator_size
  f = vae_factor(model_cfg.vae)
  want = (G // f, G // f, 2 * model_cfg.vae.latent_channels)
  if m["generator_size"] != G or m["latent"] != want:
    raise UserError(f"data.latents {c.data.latents}: encoded at {m['generator_size']} px as"
                    f" {m['latent']} moments, the run needs {G} px, {want}; rerun `imprint-jax"
                    " encode-latents`")
  probs = tuple(c.data.mask_level_probs)
  drawn = latent_store.variant_levels(probs, 1)  # also validates the probabilities
  missing = [lv for lv in drawn if lv not in m["levels"]]
  if missing:
    raise UserError(f"data.latents {c.data.latents}: no stored masks of level {missing[0]},"
                    f" which data.mask_level_probs={probs} draws; rerun `imprint-jax"
                    " encode-latents` with these probabilities")


def build(c: ml_collections.ConfigDict, *, total_steps: int, steps_per_epoch: int,
          devices=None) -> Setup:
  """Validates the config and derives the static pieces of a run (nothing is allocated)."""
  if c.stage not in (1, 2):
    raise UserError(f"config stage {c.stage}: expected 1 or 2")
  schedules = optim.schedules_from_config(c.components.to_dict()
                                          if hasattr(c.components, "to_dict") else c.components)
  if c.stage == 2 and not c.init.encoder_from and not c.allow_random_encoder:
    raise UserError("stage 2 needs the stage-1 encoder: set init.encoder_from to a stage-1"
                    " workdir or checkpoint")
  if c.init.encoder_from:  # fails loudly now, not after compiling
    ckpt_lib.resolve(c.init.encoder_from, c.init.get("encoder_from_which", "latest"))
  if c.init.checkpoint:
    ckpt_lib.resolve(c.init.checkpoint, c.init.get("checkpoint_which", "latest"))
  mesh = sharding.make_mesh(dict(c.mesh), devices)
  sharding.check_batch(c.train.global_batch, mesh)
  rules = sharding.check_rules(c.logical_axis_rules)
  model_cfg = model_config(c)
  if c.data.get("object_tokens", ""):
    _check_object_tokens(c, schedules, model_cfg)
  if c.data.get("latents", ""):
    _check_latents(c, model_cfg)
  step_cfg = step_config(c, mesh)
  boundaries = phase_boundaries(c, steps_per_epoch)
  for name, s in schedules.items():
    if s is not None:
      s.fn(boundaries, total_steps)  # checks the number of phases

  abstract_model = layers.abstract(lambda r: Imprint(model_cfg, rngs=r))
  graphdef, params, frozen = nnx.split(abstract_model, optim.trainable_filter(schedules), ...)
  tx = optim.make_optimizer(params, schedules, boundaries=boundaries, total_steps=total_steps,
                            weight_decay=c.train.weight_decay, b1=c.train.b1, b2=c.train.b2,
                            eps=c.train.eps, grad_clip=c.train.grad_clip)
  # Shardings come from the Variables' logical axes; the state itself is plain dicts.
  step = jax.ShapeDtypeStruct((), jnp.int32)
  state_shardings = sharding.values(sharding.tree_shardings(
      TrainState(step=step, params=params, frozen=frozen,
                 opt_state=jax.eval_shape(tx.init, params)), mesh, rules))
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  abstract_state = TrainState(step=step, params=params, frozen=frozen,
                              opt_state=jax.eval_shape(tx.init, params))
  if jax.tree.structure(abstract_state) != jax.tree.structure(state_shardings):
    raise AssertionError("the optimizer state of plain parameters is laid out differently from"
                         " that of nnx parameters")
  return Setup(config=c, model_cfg=model_cfg, mesh=mesh, rules=rules, schedules=schedules,
               tx=tx, graphdef=graphdef, abstract_state=abstract_state,
               state_shardings=state_shardings, step_cfg=step_cfg, total_steps=total_steps,
               boundaries=boundaries)


def _model_shardings(setup: Setup, model: Imprint) -> Any:
  return sharding.tree_shardings(nnx.state(model, nnx.Param), setup.mesh, setup.rules)


def _restore_into(setup: Setup, path: str, parts: tuple[str, ...], state: nnx.State,
                  what: str, which: str = "latest") -> None:
  """Copies the `parts` (e.g. ('dinov2', 'adapter')) of checkpoint `path` (its `which` step,
  for a workdir) into `state`, restored directly with the run's shardings. Checks the
  architectures agree."""
  ckpt = ckpt_lib.resolve(path, which)
  meta = ckpt_lib.read_meta(ckpt)
  logging.getLogger("imprint_jax.train").info("%s: %s", what, ckpt_lib.describe(ckpt, meta))
  src_cfg = ImprintConfig.from_dict(meta["model"])
  run_cfg = setup.model_cfg
  for part in parts:
    a = dataclasses.replace(getattr(src_cfg, part), dtype="float32", remat="none")
    b = dataclasses.replace(getattr(run_cfg, part), dtype="float32", remat="none")
    if part == "unet" and a.in_channels != b.in_channels:
      a = dataclasses.replace(a, in_channels=b.in_channels)
    if a != b:
      diff = [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]
      raise UserError(f"{what} {ckpt}: its {part} differs from the config in {diff[0]}"
                      f" ({getattr(a, diff[0])!r} vs {getattr(b, diff[0])!r})")
  src_run_cfg = src_cfg.with_dtype(run_cfg.unet.dtype)
  abstract = layers.abstract(lambda r: Imprint(src_run_cfg, rngs=r))
  restored = ckpt_lib.restore_model_state(ckpt, abstract, _model_shardings(setup, abstract))
  for part in parts:
    src = restored[part]
    if part == "unet" and src_cfg.unet.in_channels != run_cfg.unet.in_channels:
      src = _widened_unet_state(setup, abstract.unet, src)
    state[part] = src


def _widened_unet_state(setup: Setup, abstract_unet, unet_state: nnx.State) -> nnx.State:
  """A pretrained 4-channel UNet's state with conv_in widened to the run's channels (zeros)."""
  cfg = setup.model_cfg.unet
  target = nnx.eval_shape(lambda: widen_conv_in(nnx.merge(nnx.graphdef(abstract_unet),
                                                          unet_state), cfg.in_channels))
  shardings = sharding.tree_shardings(nnx.state(target, nnx.Param), setup.mesh, setup.rules)
  graphdef = nnx.graphdef(abstract_unet)

  @jax.jit
  def widen(s):
    return nnx.state(widen_conv_in(nnx.merge(graphdef, s), cfg.in_channels), nnx.Param)

  return jax.jit(widen, out_shardings=shardings)(unet_state)


def _random_model(setup: Setup):
  return nnx.state(Imprint(setup.model_cfg, rngs=layers.init_rngs(setup.config.seed)), nnx.Param)


def _materialise(setup: Setup, fn: Callable[[], Any], shardings: Any) -> Any:
  """fn() (a pytree of arrays) created in `shardings`.

  On accelerators and across processes: one jitted function, so each device creates only its
  own shards. In a single CPU process: op by op, then placed. XLA:CPU compiles a whole
  model's initialisation as one program slowly (the CPU benchmark's stage-2 state: 40 s of
  compilation for 0.2 s of work; a tiny config: 10 s); op by op, each op compiled once per
  shape, it takes 8 s and 0.6-5 s, with the same values (bit for bit at XLA's default
  optimisation level; `tests/test_train.py`)."""
  if setup.mesh.devices.flat[0].platform == "cpu" and jax.process_count() == 1:
    return jax.device_put(fn(), shardings)
  return jax.jit(fn, out_shardings=shardings)()


def init_model(setup: Setup) -> nnx.State:
  """The parameters of all four networks as the run starts, in the model's shardings: a random
  init, then `init.checkpoint` (an `imprint-jax import` checkpoint: all four networks; a
  4-channel UNet is widened for stage 2), then `init.encoder_from` (stage 2: DINOv2 + adapter
  of a stage-1 run)."""
  c = setup.config
  abstract_model = layers.abstract(lambda r: Imprint(setup.model_cfg, rngs=r))
  state = _materialise(setup, lambda: _random_model(setup),
                       _model_shardings(setup, abstract_model))
  if c.init.checkpoint:
    _restore_into(setup, c.init.checkpoint, ("dinov2", "adapter", "unet", "vae"), state,
                  "init.checkpoint", c.init.get("checkpoint_which", "latest"))
  if c.init.encoder_from:
    _restore_into(setup, c.init.encoder_from, ("dinov2", "adapter"), state, "init.encoder_from",
                  c.init.get("encoder_from_which", "latest"))
  return state


def init_state(setup: Setup) -> TrainState:
  """The initial training state (`init_model`'s parameters and a fresh optimizer state),
  in its shardings. Without checkpoints the whole state is created by
  one function (`_materialise`)."""
  c = setup.config
  model_graphdef = nnx.graphdef(layers.abstract(lambda r: Imprint(setup.model_cfg, rngs=r)))
  trainable = optim.trainable_filter(setup.schedules)
  tx = setup.tx

  def assemble(full):
    model = nnx.merge(model_graphdef, full)
    _, params, frozen = nnx.split(model, trainable, ...)
    params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=tx.init(params))

  if not (c.init.checkpoint or c.init.encoder_from):
    return _materialise(setup, lambda: assemble(_random_model(setup)), setup.state_shardings)
  return jax.jit(assemble, out_shardings=setup.state_shardings, donate_argnums=0)(
      init_model(setup))


def full_model_state(state: TrainState) -> dict:
  """Trained + frozen parameters as one nested dict of `Imprint`'s state (what checkpoints
  store)."""
  return merge_parts(state.params, state.frozen)
