"""Stage-2 set-up shared by the token and latent cache tests: two synthetic sources prepared
once per module, and the tiny stage-2 config that trains on them."""

from imprint_jax.data_prep import sources as data_sources
from imprint_jax.train import data as train_data
from imprint_jax.train import run_config


def tiny_config(sources, steps: int, **overrides):
  """stage2:tiny on `sources` for `steps` steps (a phase switch half-way), `overrides` as
  `--set KEY=VALUE` would give them."""
  c = run_config.load("stage2:tiny")
  c.data.sources = tuple(sources)
  c.init.encoder_from = ""
  c.allow_random_encoder = True  # a random DINOv2 / VAE is as good as any frozen one here
  c.train.num_steps = steps
  c.phases.steps = (steps // 2,)
  c.log_every, c.eval_every, c.checkpoint_every, c.sample_every = 2, steps, steps, steps
  for key, value in overrides.items():
    run_config.apply_override(c, f"{key}={value!r}")
  return c


def two_sources(workdir):
  """Two synthetic stage-2 sources prepared in `workdir`: [(folder, weight)]."""
  c = run_config.load("stage2:tiny")
  c.data.sources = (("synthetic:images", 2.0), ("synthetic:youtube_vos", 1.0))
  data_sources.prepare_sources(c, workdir)  # the caller prepares; the trainer only opens
  return train_data.resolve_sources(c, workdir)
