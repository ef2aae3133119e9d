"""imprint-jax: IMPRINT generative object compositing (CVPR 2024) in JAX/Flax NNX.

    import imprint_jax
    out = imprint_jax.composite("ckpt", "object.png", "background.jpg", box=(40, 60, 200, 260))

Subpackages: models (DINOv2, adapter, UNet, VAE), convert (PyTorch weights both ways), data
(pipelines), train (steps, sharding, loop), metrics (evaluation networks).
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing imprint_jax must not start JAX (`plan` sets it up)
  if name == "composite":
    from imprint_jax.compositing import composite
    return composite
  raise AttributeError(f"module 'imprint_jax' has no attribute {name!r}")
