"""Diffusion: the noise schedule and training targets (`schedules`), samplers (`samplers`) and
the compositing sampler loop (`generate`)."""
