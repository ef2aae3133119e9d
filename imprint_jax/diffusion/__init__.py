"""Diffusion: the noise schedule and training targets (`schedules`), the samplers and
classifier-free guidance (`samplers`), background latent blending during sampling (`blending`)
and generation with an IMPRINT model, object -> view or composite latents (`generate`).

Depends on models, parallel and errors only; compositing, training and evaluation use it.
"""
