"""Training: the run setup, the jitted stage-1/stage-2 step functions, per-component optimizers,
the loop with its checkpoints, and the object-token and latent caches."""
