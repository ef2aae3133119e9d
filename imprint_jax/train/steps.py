"""The two IMPRINT training steps as pure functions `(state, batch, rng) -> (state, metrics)`.

Both share the latent-diffusion loss and the optimizer update; they differ in what conditions
the UNet:
  stage 1: the segmented object (view i) -> tokens; the UNet denoises view j (background removed).
  stage 2: the object -> tokens; the UNet sees [noisy target latent, masked-background latent,
           coarse mask] and denoises the target with its background.

The step key is `fold_in(rng, step)`, split into one key per sample; every random draw of a
sample (its VAE latent noise, embedding dropout, timestep and diffusion noise) comes from its own
key. So a run is reproducible and independent of how the batch is sharded, how many processes
feed it, and how many microbatches its gradient is accumulated over (`StepConfig.microbatches`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imprint_jax.diffusion import schedules
from imprint_jax.parallel import sharding
from imprint_jax.models.imprint import Imprint, mask_to_latent, vae_factor
from imprint_jax.train.optim import applied_learning_rates


@flax.struct.dataclass
class TrainState:
  """What a step carries over. The model's parts are plain nested dicts of arrays, as
  `nnx.to_pure_dict` gives them (`nnx.merge(graphdef, params, frozen)` takes them as they are):
  JAX flattens and rebuilds dicts in C++, whereas every `nnx.Variable` leaf costs a Python
  call each time a jitted step takes or returns the state (thousands of leaves; measurable on
  a CPU step, docs/performance.md)."""
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: dict             # trained parameters
  frozen: dict             # everything else (frozen components, the VAE)
  opt_state: Any           # its moments are dicts shaped like `params`


def merge_parts(params: dict, frozen: dict) -> dict:
  """Trained + frozen parts -> the whole model's nested dict (a component such as the UNet
  may be split between the two)."""
  out = dict(params)
  for k, v in frozen.items():
    out[k] = merge_parts(out[k], v) if k in out else v
  return out


def select_like(full: dict, like: dict) -> dict:
  """The entries of nested dict `full` at the paths of `like` (the inverse of merge_parts)."""
  return {k: select_like(full[k], v) if isinstance(v, dict) else full[k]
          for k, v in like.items()}


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The loss settings, and over how many equal microbatches one step accumulates its gradient
  (one optimizer update per step either way; activations are those of one microbatch)."""
  embed_dropout: float
  prediction_type: str = "epsilon"
  num_train_timesteps: int = 1000
  microbatches: int = 1


def _split_keys(keys_B: jax.Array, n: int) -> list[jax.Array]:
  """(B,) per-sample keys -> n independent (B,) per-sample keys."""
  ks = jax.vmap(lambda k: jax.random.split(k, n))(keys_B)
  return [ks[:, i] for i in range(n)]


def _per_sample_noise(keys_B: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """N(0, 1) of shape (B, *shape), sample b drawn from keys_B[b]."""
  return jax.vmap(lambda k: schedules.gaussian_noise(k, shape, dtype))(keys_B)


def _sample_latents(model: Imprint, mean: jax.Array, logvar: jax.Array, keys_B: jax.Array
                    ) -> jax.Array:
  """The VAE posterior N(mean, exp(logvar)) -> scaled latent sample (no gradient)."""
  z = mean + jnp.exp(0.5 * logvar) * _per_sample_noise(keys_B, mean.shape[1:], mean.dtype)
  return jax.lax.stop_gradient(z * model.cfg.vae.scaling_factor)


def _encode_latents(model: Imprint, x_BHWC: jax.Array, keys_B: jax.Array) -> jax.Array:
  """Frozen VAE: image in [-1, 1] -> scaled latent sample (no gradient)."""
  return _sample_latents(model, *model.vae.encode(x_BHWC), keys_B)


def _latents_of(model: Imprint, batch: dict[str, jax.Array], name: str, keys_B: jax.Array
                ) -> jax.Array:
  """The scaled latent sample of image `batch[name]`: from its precomputed posterior
  `batch[name + '_moments']` ([mean, logvar] on channels; stage 2, `data.latents`) when the
  batch has it, else by running the VAE encoder. The same draw either way."""
  moments = batch.get(f"{name}_moments")
  if moments is None:
    return _encode_latents(model, batch[name], keys_B)
  mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
  return _sample_latents(model, mean, logvar, keys_B)


def _context(model: Imprint, batch: dict[str, jax.Array], keys_B: jax.Array, p_drop: float
             ) -> jax.Array:
  """The object's cross-attention context, each sample replaced by the learned null context
  with probability p_drop (classifier-free guidance). From the batch's precomputed DINOv2
  tokens when it has them (stage 2, `data.object_tokens`), else from the object pixels."""
  if "object_tokens" in batch:
    ctx = model.adapter(batch["object_tokens"])
  else:
    ctx = model.encode_object(batch["object"])
  if p_drop <= 0:
    return ctx
  drop_B = jax.vmap(lambda k: jax.random.bernoulli(k, p_drop))(keys_B)
  null = model.adapter.null(ctx.shape[0], ctx.shape[1]).astype(ctx.dtype)
  return jnp.where(drop_B[:, None, None], null, ctx)


def _denoising_loss(model: Imprint, z0: jax.Array, ctx: jax.Array, cond: Callable,
                    keys_B: jax.Array, cfg: StepConfig) -> jax.Array:
  """E_t,eps || f(cond(x_t), t, ctx) - target ||^2 in float32, t uniform over training steps."""
  schedule = schedules.sd_schedule(num_train_timesteps=cfg.num_train_timesteps)
  t_keys, n_keys = _split_keys(keys_B, 2)
  t_B = jax.vmap(lambda k: jax.random.randint(k, (), 0, cfg.num_train_timesteps))(t_keys)
  noise = _per_sample_noise(n_keys, z0.shape[1:], jnp.float32)
  x_t = schedules.add_noise(schedule, z0, noise, t_B)
  target = schedules.training_target(schedule, z0, noise, t_B, cfg.prediction_type)
  pred = model.unet(cond(x_t), t_B, ctx)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def stage1_loss(model: Imprint, batch: dict[str, jax.Array], keys_B: jax.Array,
                cfg: StepConfig) -> jax.Array:
  """batch: object (B, E, E, 3) normalised, target (B, G, G, 3) in [-1, 1], background removed.
  keys_B: one PRNG key per sample."""
  vae_keys, drop_keys, diff_keys = _split_keys(keys_B, 3)
  z0 = _encode_latents(model, batch["target"], vae_keys)
  ctx = _context(model, batch, drop_keys, cfg.embed_dropout)
  return _denoising_loss(model, z0, ctx, lambda x_t: x_t, diff_keys, cfg)


def stage2_loss(model: Imprint, batch: dict[str, jax.Array], keys_B: jax.Array,
                cfg: StepConfig) -> jax.Array:
  """batch: object (or object_tokens (B, L, D)), target, mask (B, G, G, 1) in {0, 1},
  masked_target (B, G, G, 3); with precomputed latents target_moments, masked_target_moments
  (B, G/f, G/f, 2C) and mask_latent (B, G/f, G/f, 1) instead of target, masked_target, mask.
  keys_B: one PRNG key per sample."""
  vae_keys, bg_keys, drop_keys, diff_keys = _split_keys(keys_B, 4)
  z0 = _latents_of(model, batch, "target", vae_keys)
  z_bg = _latents_of(model, batch, "masked_target", bg_keys)
  m_lat = batch.get("mask_latent")
  if m_lat is None:
    m_lat = mask_to_latent(batch["mask"], vae_factor(model.cfg.vae))
  ctx = _context(model, batch, drop_keys, cfg.embed_dropout)
  return _denoising_loss(model, z0, ctx, lambda x_t: model.unet_input(x_t, z_bg, m_lat),
                         diff_keys, cfg)


LOSSES = {1: stage1_loss, 2: stage2_loss}


def _batch_size(batch: dict[str, jax.Array]) -> int:
  return next(iter(batch.values())).shape[0]


def _microbatches(tree: Any, m: int) -> Any:
  """(B, ...) leaves -> (m, B // m, ...): microbatch i holds samples i, i + m, i + 2m, ... so
  every device's contiguous block of the batch holds its share of every microbatch (no data
  moves between devices)."""
  return jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1), tree)


def _make_step(loss_fn: Callable, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               cfg: StepConfig) -> Callable:
  m = cfg.microbatches

  def step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    keys_B = jax.random.split(rng, _batch_size(batch))

    def loss_of(params, batch, keys_B):
      return loss_fn(nnx.merge(graphdef, params, state.frozen), batch, keys_B, cfg)

    grad_fn = jax.value_and_grad(loss_of)
    if m == 1:
      loss, grads = grad_fn(state.params, batch, keys_B)
    else:
      def accumulate(acc, micro):
        micro = jax.tree.map(sharding.shard_batch, micro)
        return jax.tree.map(jnp.add, acc, grad_fn(state.params, *micro)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, _microbatches((batch, keys_B), m))
      loss, grads = jax.tree.map(lambda x: x / m, (loss, grads))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    metrics.update({f"lr/{k}": v for k, v in applied_learning_rates(opt_state).items()})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_train_step(stage: int, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    cfg: StepConfig) -> Callable:
  """The (un-jitted) step of `stage`; the trainer jits it with shardings and donation."""
  return _make_step(LOSSES[stage], graphdef, tx, cfg)


def make_eval_step(stage: int, graphdef: nnx.GraphDef, cfg: StepConfig) -> Callable:
  """Validation loss, `(state, batch, rng) -> {'loss'}`, with no embedding dropout."""
  loss_fn = LOSSES[stage]
  cfg = dataclasses.replace(cfg, embed_dropout=0.0)

  def eval_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    model = nnx.merge(graphdef, state.params, state.frozen)
    return {"loss": loss_fn(model, batch, jax.random.split(rng, _batch_size(batch)), cfg)}

  return eval_step
