"""JAX samplers for SD-family models: DDIM and DPM-Solver++ 2M, classifier-free guidance, DDIM
inversion. The whole loop is one `jax.lax.fori_loop`: the denoiser is traced once, whatever the
number of steps, and `sample` can be jitted as a whole.

Timesteps follow what diffusers does with the SD 1.x/2.x `scheduler_config.json`
(`steps_offset=1`, `set_alpha_to_one=false`, no `timestep_spacing` key, so each scheduler's
default spacing):

  ddim      `DDIMScheduler`, "leading": t_i = (n-1-i) * (T // n) + 1, eta as given; after the
            last step x sits at noise level abar_0 (`set_alpha_to_one=false`).
  dpmpp_2m  `DPMSolverMultistepScheduler` (algorithm "dpmsolver++", solver_order 2, midpoint,
            lower_order_final, final sigma 0), "linspace": t_i = round(linspace(0, T-1, n+1))
            reversed, last dropped; first and last steps are first order; ends at the clean
            sample.

Usage, with the conditioning closed over by the caller:

    denoise = cfg_denoise_fn(lambda x, t, ctx: unet(x, t, ctx), cond_BLD, uncond_BLD, 7.5)
    x0 = sample(denoise, x_T, num_steps=50, sampler="ddim", schedule=sd_schedule())

`denoise_fn(x_t, t_B) -> model_out` must be a pure function of its arguments and of what it
closes over (build it inside the jitted function when it closes over traced values).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from imprint_jax.diffusion.schedules import (NoiseSchedule, alpha_bar, check_prediction_type,
                                   gaussian_noise, x0_eps_from_alpha_bar)
from imprint_jax.errors import UserError

SAMPLERS = ("ddim", "dpmpp_2m")
# SD 1.x/2.x scheduler_config.json: steps_offset=1 (used by DDIM's "leading" spacing).
DDIM_STEPS_OFFSET = 1

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
BlendFn = Callable[[jax.Array, jax.Array], jax.Array]


def timesteps(sampler: str, num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
  """The model timesteps of the `num_steps` sampling steps, descending, int64 (static)."""
  if sampler not in SAMPLERS:
    raise UserError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise UserError(f"num_steps={num_steps!r}: must be a positive integer")
  if sampler == "ddim":
    ratio = num_train_timesteps // num_steps
    ts = np.arange(num_steps)[::-1] * ratio + DDIM_STEPS_OFFSET
  else:
    ts = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
  ts = ts.astype(np.int64)
  if ts.max() >= num_train_timesteps or ts.min() < 0 or len(set(ts.tolist())) < num_steps:
    raise UserError(f"num_steps={num_steps} is too many for {sampler} with"
                    f" {num_train_timesteps} training timesteps")
  return ts


def _ddim_tables(schedule: NoiseSchedule, num_steps: int, eta: float):
  T = schedule.num_train_timesteps
  ts = timesteps("ddim", num_steps, T)
  prev = ts - T // num_steps
  # With set_alpha_to_one=false the step below t=0 lands on abar_0, i.e. timestep 0.
  t_next = np.maximum(prev, 0)
  a_t, a_prev = alpha_bar(schedule, ts), alpha_bar(schedule, t_next)
  var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
  std = eta * jnp.sqrt(var)
  return ts, t_next, a_t, jnp.sqrt(a_prev), jnp.sqrt(1.0 - a_prev - std ** 2), std


def _dpmpp_2m_tables(schedule: NoiseSchedule, num_steps: int):
  """Per-step coefficients of x_next = A x + B m0 + C (m0 - m1), m = x0 predictions."""
  ts = timesteps("dpmpp_2m", num_steps, schedule.num_train_timesteps)
  t_next = np.concatenate([ts[1:], [-1]])  # -1: the final sigma is 0 (clean sample)
  a_s, a_t = alpha_bar(schedule, ts), alpha_bar(schedule, t_next)
  alpha_s, sigma_s = jnp.sqrt(a_s), jnp.sqrt(1.0 - a_s)
  alpha_t, sigma_t = jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t)
  # exp(-h) with h = lambda_t - lambda_s, lambda = log(alpha / sigma); written as a ratio so
  # the final step (sigma_t = 0, lambda_t = inf) needs no infinities.
  exp_neg_h = (sigma_t * alpha_s) / (alpha_t * sigma_s)
  A = sigma_t / sigma_s
  B = alpha_t * (1.0 - exp_neg_h)
  i = np.arange(num_steps)
  second = (i >= 1) & (i <= num_steps - 2)  # first step: no history; last: lower_order_final
  lam = jnp.log(alpha_s) - jnp.log(sigma_s)
  h = jnp.concatenate([lam[1:], lam[-1:]]) - lam             # finite dummy on the last step
  h_0 = lam - jnp.concatenate([lam[:1], lam[:-1]])           # 0 on the first step
  # D1 = (m0 - m1) / r0 with r0 = h_0 / h; the midpoint rule weighs it by B / 2.
  C = jnp.where(second, 0.5 * B * h / jnp.where(second, h_0, 1.0), 0.0)
  return ts, t_next, a_s, A, B, C


def sample(denoise_fn: DenoiseFn, x_T: jax.Array, *, num_steps: int, schedule: NoiseSchedule,
           sampler: str = "ddim", prediction_type: str = "epsilon", eta: float = 0.0,
           rng: jax.Array | None = None, blend_fn: BlendFn | None = None) -> jax.Array:
  """Runs the sampler from pure noise x_T (B, ...) (unit variance: SD's init sigma is 1).

  Args:
    denoise_fn: `(x_t (B, ...) float32, t_B (B,) int32) -> model output (B, ...)`, an epsilon
      or v prediction as `prediction_type` says.
    x_T: the starting latent; the loop runs in float32 and returns x_T's dtype.
    num_steps, sampler: static; see `timesteps`.
    eta: DDIM's stochasticity (0 = deterministic), a Python float; step i draws its noise as
      `jax.random.normal(jax.random.fold_in(rng, i), x.shape)`. Must be 0 for dpmpp_2m.
    blend_fn: optional `(x (B, ...), t_next_B (B,) int32) -> x`, applied after every step;
      t_next is the noise level x is now at (0 = abar_0 after DDIM's last step, -1 = clean
      after DPM-Solver's last step; `schedules.add_noise` understands both).

  Returns:
    The sample, (B, ...) - latents when the model is a latent-diffusion UNet.
  """
  check_prediction_type(prediction_type)
  if sampler not in SAMPLERS:
    raise UserError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
  if eta < 0:
    raise UserError(f"eta={eta}: must be >= 0")
  if eta > 0 and sampler != "ddim":
    raise UserError(f"eta={eta} is a DDIM option; {sampler} is deterministic (use eta=0)")
  if eta > 0 and rng is None:
    raise UserError(f"eta={eta} draws fresh noise every step: pass rng=")
  batch = x_T.shape[0]
  x = x_T.astype(jnp.float32)

  def model(x, t):
    t_B = jnp.full((batch,), t, jnp.int32)
    return denoise_fn(x, t_B)

  def blend(x, t_next):
    if blend_fn is None:
      return x
    return blend_fn(x, jnp.full((batch,), t_next, jnp.int32)).astype(jnp.float32)

  if sampler == "ddim":
    ts, t_next, a_t, c_x0, c_eps, std = _ddim_tables(schedule, num_steps, eta)
    ts, t_next = jnp.asarray(ts, jnp.int32), jnp.asarray(t_next, jnp.int32)

    def ddim_step(i, x):
      x0, eps = x0_eps_from_alpha_bar(a_t[i], model(x, ts[i]), x, prediction_type)
      x = c_x0[i] * x0 + c_eps[i] * eps
      if eta > 0:
        x = x + std[i] * gaussian_noise(jax.random.fold_in(rng, i), x.shape)
      return blend(x, t_next[i])

    x = jax.lax.fori_loop(0, num_steps, ddim_step, x)
  else:
    ts, t_next, a_s, A, B, C = _dpmpp_2m_tables(schedule, num_steps)
    ts, t_next = jnp.asarray(ts, jnp.int32), jnp.asarray(t_next, jnp.int32)

    def dpm_step(i, carry):
      x, m_prev = carry
      m0, _ = x0_eps_from_alpha_bar(a_s[i], model(x, ts[i]), x, prediction_type)
      x = A[i] * x + B[i] * m0 + C[i] * (m0 - m_prev)
      return blend(x, t_next[i]), m0

    x, _ = jax.lax.fori_loop(0, num_steps, dpm_step, (x, jnp.zeros_like(x)))
  return x.astype(x_T.dtype)


def ddim_invert(denoise_fn: DenoiseFn, x0: jax.Array, num_steps: int, schedule: NoiseSchedule,
                prediction_type: str = "epsilon") -> jax.Array:
  """Deterministic DDIM inversion (eta = 0): a clean latent x0 (B, ...) -> the x_T from which
  `sample(..., sampler="ddim", num_steps=num_steps)` regenerates it (approximately: the model
  is evaluated at the lower noise level, as in diffusers' `DDIMInverseScheduler` with
  set_alpha_to_one=false, steps_offset=1). Returns x0's dtype."""
  check_prediction_type(prediction_type)
  T = schedule.num_train_timesteps
  ts_up = timesteps("ddim", num_steps, T)[::-1].copy()
  a_from = alpha_bar(schedule, np.maximum(ts_up - T // num_steps, 0))
  a_to = alpha_bar(schedule, ts_up)
  ts_up = jnp.asarray(ts_up, jnp.int32)
  batch = x0.shape[0]

  def step(i, x):
    out = denoise_fn(x, jnp.full((batch,), ts_up[i], jnp.int32))
    x0_pred, eps = x0_eps_from_alpha_bar(a_from[i], out, x, prediction_type)
    return jnp.sqrt(a_to[i]) * x0_pred + jnp.sqrt(1.0 - a_to[i]) * eps

  x = jax.lax.fori_loop(0, num_steps, step, x0.astype(jnp.float32))
  return x.astype(x0.dtype)


def cfg_denoise_fn(model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond_ctx: Any,
                   uncond_ctx: Any, guidance_scale: float | jax.Array) -> DenoiseFn:
  """Classifier-free guidance as a `denoise_fn`: one model call on the doubled batch.

  `model_fn(x (2B, ...), t (2B,), ctx) -> out (2B, ...)`; `cond_ctx`/`uncond_ctx` are pytrees
  of (B, ...) arrays with the same structure (put everything batch-shaped the model needs, e.g.
  the masked-background latent and the mask, in both). Returns
  `cond + (s - 1) * (cond - uncond)`, i.e. `uncond + s * (cond - uncond)` written so that s = 1
  gives the conditional prediction exactly. With `uncond_ctx=None` or a Python scale of 1 the
  unconditional half is skipped.
  """
  if uncond_ctx is None or (isinstance(guidance_scale, (int, float)) and guidance_scale == 1):
    return lambda x, t: model_fn(x, t, cond_ctx)
  if jax.tree.structure(cond_ctx) != jax.tree.structure(uncond_ctx):
    raise UserError("classifier-free guidance: the conditional and unconditional contexts have"
                    " different structures")
  both_ctx = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond_ctx, uncond_ctx)

  def denoise(x: jax.Array, t_B: jax.Array) -> jax.Array:
    b = x.shape[0]
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t_B, t_B], axis=0),
                   both_ctx)
    cond, uncond = out[:b], out[b:]
    return cond + (guidance_scale - 1.0) * (cond - uncond)

  return denoise
