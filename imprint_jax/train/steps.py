"""The two IMPRINT training steps as pure functions `(state, batch, rng) -> (state, metrics)`.

Both share the latent-diffusion loss and the optimizer update; they differ in what conditions
the UNet:
  stage 1: the segmented object (view i) -> tokens; the UNet denoises view j (background removed).
  stage 2: the object -> tokens; the UNet sees [noisy target latent, masked-background latent,
           coarse mask] and denoises the target with its background.

The step key is `fold_in(rng, step)`, so a run is reproducible and independent of how the batch
is sharded or how many processes feed it.
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

from imprint_jax import diffusion
from imprint_jax.models.imprint import Imprint, mask_to_latent, vae_factor
from imprint_jax.train.optim import applied_learning_rates


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps taken
  params: nnx.State        # trained parameters
  frozen: nnx.State        # everything else (frozen components, the VAE)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
  embed_dropout: float
  prediction_type: str = "epsilon"
  num_train_timesteps: int = 1000


def _encode_latents(model: Imprint, x_BHWC: jax.Array, rng: jax.Array) -> jax.Array:
  """Frozen VAE: image in [-1, 1] -> scaled latent sample (no gradient)."""
  mean, logvar = model.vae.encode(x_BHWC)
  z = mean + jnp.exp(0.5 * logvar) * diffusion.gaussian_noise(rng, mean.shape, mean.dtype)
  return jax.lax.stop_gradient(z * model.cfg.vae.scaling_factor)


def _context(model: Imprint, obj_BHWC: jax.Array, rng: jax.Array, p_drop: float) -> jax.Array:
  """Object tokens, each sample replaced by the learned null context with probability p_drop
  (classifier-free guidance)."""
  ctx = model.encode_object(obj_BHWC)
  if p_drop <= 0:
    return ctx
  drop_B = jax.random.bernoulli(rng, p_drop, (ctx.shape[0],))
  null = model.adapter.null(ctx.shape[0], ctx.shape[1]).astype(ctx.dtype)
  return jnp.where(drop_B[:, None, None], null, ctx)


def _denoising_loss(model: Imprint, z0: jax.Array, ctx: jax.Array, cond: Callable, rng: jax.Array,
                    cfg: LossConfig) -> jax.Array:
  """E_t,eps || f(cond(x_t), t, ctx) - target ||^2 in float32, t uniform over training steps."""
  schedule = diffusion.sd_schedule(num_train_timesteps=cfg.num_train_timesteps)
  t_rng, n_rng = jax.random.split(rng)
  t_B = jax.random.randint(t_rng, (z0.shape[0],), 0, cfg.num_train_timesteps)
  noise = diffusion.gaussian_noise(n_rng, z0.shape, jnp.float32)
  x_t = diffusion.add_noise(schedule, z0, noise, t_B)
  target = diffusion.training_target(schedule, z0, noise, t_B, cfg.prediction_type)
  pred = model.unet(cond(x_t), t_B, ctx)
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))


def stage1_loss(model: Imprint, batch: dict[str, jax.Array], rng: jax.Array,
                cfg: LossConfig) -> jax.Array:
  """batch: object (B, E, E, 3) normalised, target (B, G, G, 3) in [-1, 1], background removed."""
  vae_rng, drop_rng, diff_rng = jax.random.split(rng, 3)
  z0 = _encode_latents(model, batch["target"], vae_rng)
  ctx = _context(model, batch["object"], drop_rng, cfg.embed_dropout)
  return _denoising_loss(model, z0, ctx, lambda x_t: x_t, diff_rng, cfg)


def stage2_loss(model: Imprint, batch: dict[str, jax.Array], rng: jax.Array,
                cfg: LossConfig) -> jax.Array:
  """batch: object, target, mask (B, G, G, 1) in {0, 1}, masked_target (B, G, G, 3)."""
  vae_rng, bg_rng, drop_rng, diff_rng = jax.random.split(rng, 4)
  z0 = _encode_latents(model, batch["target"], vae_rng)
  z_bg = _encode_latents(model, batch["masked_target"], bg_rng)
  m_lat = mask_to_latent(batch["mask"], vae_factor(model.cfg.vae))
  ctx = _context(model, batch["object"], drop_rng, cfg.embed_dropout)
  return _denoising_loss(model, z0, ctx, lambda x_t: model.unet_input(x_t, z_bg, m_lat),
                         diff_rng, cfg)


LOSSES = {1: stage1_loss, 2: stage2_loss}


def _make_step(loss_fn: Callable, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               cfg: LossConfig) -> Callable:

  def step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)

    def loss_of(params):
      return loss_fn(nnx.merge(graphdef, params, state.frozen), batch, rng, cfg)

    loss, grads = jax.value_and_grad(loss_of)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
    metrics.update({f"lr/{k}": v for k, v in applied_learning_rates(opt_state).items()})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_train_step(stage: int, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    cfg: LossConfig) -> Callable:
  """The (un-jitted) step of `stage`; the trainer jits it with shardings and donation."""
  return _make_step(LOSSES[stage], graphdef, tx, cfg)


def make_eval_step(stage: int, graphdef: nnx.GraphDef, cfg: LossConfig) -> Callable:
  """Validation loss, `(state, batch, rng) -> {'loss'}`, with no embedding dropout."""
  loss_fn = LOSSES[stage]
  cfg = dataclasses.replace(cfg, embed_dropout=0.0)

  def eval_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    model = nnx.merge(graphdef, state.params, state.frozen)
    return {"loss": loss_fn(model, batch, rng, cfg)}

  return eval_step
