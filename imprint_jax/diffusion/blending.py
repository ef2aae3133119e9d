"""Background latent blending: the sampler keeps the known background outside the region.

After every sampler step the latent outside the generation region is replaced by the
background's clean latent noised to the level the step has reached, with the run's initial
noise x_T (as diffusers' inpainting pipelines do):

    x <- m * x + (1 - m) * add_noise(z_background, x_T, t_next)

so the background is kept and the model only has to make the region and its seam consistent.
This acts on latents inside the sampling loop; the feathered pixel paste at full resolution
after decoding is output assembly (`compositing.paste`).
"""

from __future__ import annotations

import jax

from imprint_jax.diffusion import schedules
from imprint_jax.diffusion.samplers import BlendFn


def latent_blend_fn(schedule: schedules.NoiseSchedule, z_background_BhwC: jax.Array,
                    x_T_BhwC: jax.Array, mask_Bhw1: jax.Array) -> BlendFn:
  """The `blend_fn` of `samplers.sample` that keeps the background outside the mask.

  Args:
    schedule: the noise schedule the sampler runs on.
    z_background_BhwC: the whole background's scaled latent (clean).
    x_T_BhwC: the sampler's initial noise (float32); the background is noised with it.
    mask_Bhw1: the generation region at latent resolution, in [0, 1] (1 = generate).

  Returns:
    `(x (B, h, w, C), t_next_B (B,) int32) -> x`; at t_next = -1 (the clean level after
    DPM-Solver's last step) the background latent is kept exactly.
  """
  def blend_fn(x: jax.Array, t_next: jax.Array) -> jax.Array:
    keep = schedules.add_noise(schedule, z_background_BhwC, x_T_BhwC, t_next)
    return mask_Bhw1 * x + (1.0 - mask_Bhw1) * keep

  return blend_fn
