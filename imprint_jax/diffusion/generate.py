"""Generation with an IMPRINT model: object tokens -> latents -> pixels.

Shared by the training loop's sample grids and by compositing. Pure functions of the model;
callers jit them (the sampler loop is one `fori_loop`, traced once).

`rng` is one key for the whole batch, or one key per batch element (raw keys (B, 2) or typed
keys (B,)): then each element's noise depends on its own key only, so an element gives the same
result whatever else shares its batch (compositing relies on this for seeded, batch-invariant
outputs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imprint_jax.diffusion import blending
from imprint_jax.diffusion import samplers
from imprint_jax.diffusion import schedules
from imprint_jax.models.imprint import Imprint, mask_to_latent, vae_factor


def encode_image(model: Imprint, x_BHWC: jax.Array) -> jax.Array:
  """Image in [-1, 1] -> scaled latent (the distribution's mean: deterministic)."""
  mean, _ = model.vae.encode(x_BHWC)
  return mean * model.cfg.vae.scaling_factor


def decode_latent(model: Imprint, z_BhwC: jax.Array) -> jax.Array:
  """Scaled latent -> image in [-1, 1] (clipped), float32."""
  x = model.vae.decode(z_BhwC / model.cfg.vae.scaling_factor)
  return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)


def _is_key_batch(rng: jax.Array) -> bool:
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def _split2(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two independent keys (or key batches) from one key (or one key per element)."""
  if _is_key_batch(rng):
    pairs = jax.vmap(jax.random.split)(rng)
    return pairs[:, 0], pairs[:, 1]
  a, b = jax.random.split(rng)
  return a, b


def _normal(rng: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal float32 noise of `shape`; per-element keys draw each row on its own."""
  if _is_key_batch(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(f"{rng.shape[0]} keys for a batch of {shape[0]}")
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(rng)
  return jax.random.normal(rng, shape, jnp.float32)


def _guided(model: Imprint, ctx: jax.Array, guidance: float, extra_in=None):
  """CFG denoiser; `extra_in(x)` builds the UNet input (stage 2 concatenates conditions)."""
  null = model.adapter.null(ctx.shape[0], ctx.shape[1]).astype(ctx.dtype)
  build = (lambda x, c: x) if extra_in is None else extra_in

  def model_fn(x, t, c):
    ctx_, cond = c
    return model.unet(build(x, cond), t, ctx_)

  return lambda cond: samplers.cfg_denoise_fn(model_fn, (ctx, cond), (null, cond), guidance)


def generate_views(model: Imprint, object_BEE3: jax.Array, rng: jax.Array, *, latent_hw: int,
                   num_steps: int, guidance: float, sampler: str = "ddim",
                   prediction_type: str = "epsilon") -> jax.Array:
  """Stage 1: a new view of each object, (B, H, W, 3) in [-1, 1]."""
  ctx = model.encode_object(object_BEE3)
  b = object_BEE3.shape[0]
  c = model.cfg.vae.latent_channels
  x_T = _normal(rng, (b, latent_hw, latent_hw, c))
  denoise = _guided(model, ctx, guidance)(jnp.zeros((b,), jnp.float32))
  z = samplers.sample(denoise, x_T, num_steps=num_steps, schedule=schedules.sd_schedule(),
                      sampler=sampler, prediction_type=prediction_type)
  return decode_latent(model, z)


def composite_latents(model: Imprint, object_BEE3: jax.Array, background_BHW3: jax.Array,
                      mask_BHW1: jax.Array, rng: jax.Array, *, num_steps: int, guidance: float,
                      sampler: str = "ddim", prediction_type: str = "epsilon",
                      blend: bool = True, x_T: jax.Array | None = None) -> jax.Array:
  """Stage 2: generate the object into the masked region of the background.

  Args:
    object_BEE3: normalised object crops (DINOv2 input).
    background_BHW3: background crops in [-1, 1] at model resolution (the real pixels
      everywhere, including under the mask).
    mask_BHW1: generation region in {0, 1}.
    rng: noise keys (see the module docstring); unused when `x_T` is given.
    blend: background latent blending (`blending.latent_blend_fn`): after every step, the
      latent outside the mask is replaced by the background's latent noised to the step's
      level with the initial noise x_T, so the background is kept.
    x_T: optional initial noise (B, h, w, C) (e.g. to reproduce a PyTorch run); default
      drawn from `rng`.

  Returns:
    The final latent (B, h, w, C), scaled.
  """
  ctx = model.encode_object(object_BEE3)
  factor = vae_factor(model.cfg.vae)
  z_bg = encode_image(model, background_BHW3 * (1.0 - mask_BHW1))   # the condition
  z_full = encode_image(model, background_BHW3)                    # what blending keeps
  m_lat = mask_to_latent(mask_BHW1, factor)
  if x_T is None:
    x_T = _normal(_split2(rng)[0], z_full.shape)
  elif x_T.shape != z_full.shape:
    raise ValueError(f"initial latents of shape {x_T.shape}; this batch needs {z_full.shape}")
  x_T = x_T.astype(jnp.float32)
  schedule = schedules.sd_schedule()
  denoise = _guided(model, ctx, guidance,
                    lambda x, cond: model.unet_input(x, cond[0], cond[1]))((z_bg, m_lat))

  blend_fn = blending.latent_blend_fn(schedule, z_full, x_T, m_lat) if blend else None
  return samplers.sample(denoise, x_T, num_steps=num_steps, schedule=schedule, sampler=sampler,
                         prediction_type=prediction_type, blend_fn=blend_fn)
