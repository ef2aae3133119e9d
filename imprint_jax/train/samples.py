"""Sample grids written during training: one row per validation example.

  stage 1: object (input view) | target view | generated view
  stage 2: object | masked background | target | composite
"""

from __future__ import annotations

import io

import jax
import numpy as np
from flax import nnx
from PIL import Image

from etils import epath

from imprint_jax import storage
from imprint_jax.diffusion import generate
from imprint_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from imprint_jax.models.imprint import vae_factor

MAX_ROWS = 8
_CACHE: dict = {}


def to_uint8(x_BHWC: np.ndarray, normalised: bool = False) -> np.ndarray:
  """[-1, 1] images (or ImageNet-normalised ones) -> uint8."""
  x = np.asarray(x_BHWC, np.float32)
  x = x * IMAGENET_STD + IMAGENET_MEAN if normalised else (x + 1) / 2
  return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def grid(columns: list[np.ndarray], size: int) -> np.ndarray:
  """Columns of (B, h, w, 3) uint8 images -> one (B*size, C*size, 3) uint8 grid."""
  rows = []
  for i in range(columns[0].shape[0]):
    cells = [np.asarray(Image.fromarray(c[i]).resize((size, size), Image.BILINEAR))
             for c in columns]
    rows.append(np.concatenate(cells, axis=1))
  return np.concatenate(rows, axis=0)


def _sampler(setup):
  key = id(setup)
  if key not in _CACHE:
    c = setup.config
    graphdef = setup.graphdef
    latent_hw = c.data.generator_size // vae_factor(setup.model_cfg.vae)
    common = dict(num_steps=c.sample_steps, guidance=c.sample_guidance,
                  prediction_type=c.train.prediction_type)

    if setup.stage == 1:
      @jax.jit
      def run(state, batch, rng):
        model = nnx.merge(graphdef, state.params, state.frozen)
        return generate.generate_views(model, batch["object"], rng, latent_hw=latent_hw,
                                       **common)
    else:
      @jax.jit
      def run(state, batch, rng):
        model = nnx.merge(graphdef, state.params, state.frozen)
        z = generate.composite_latents(model, batch["object"], batch["target"], batch["mask"],
                                       rng, **common)
        return generate.decode_latent(model, z)
    _CACHE.clear()
    _CACHE[key] = run
  return _CACHE[key]


def write_grid(c, setup, state, batch, out_dir: epath.Path, step: int) -> epath.Path | None:
  with jax.set_mesh(setup.mesh):
    out = _sampler(setup)(state, batch, jax.random.PRNGKey(c.seed + 2))
  if not out.is_fully_addressable or jax.process_index() != 0:
    return None  # multi-host: no process holds the whole batch; grids are a 1-host feature
  out = np.asarray(jax.device_get(out))
  host = {k: np.asarray(jax.device_get(v))[:MAX_ROWS] for k, v in batch.items()}
  n = min(MAX_ROWS, out.shape[0])
  cols = [to_uint8(host["object"][:n], normalised=True)]
  if setup.stage == 2:
    cols.append(to_uint8(host["masked_target"][:n]))
  cols += [to_uint8(host["target"][:n]), to_uint8(out[:n])]
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"step_{step:07d}.png"
  png = io.BytesIO()
  Image.fromarray(grid(cols, c.data.generator_size)).save(png, format="PNG")
  storage.write_bytes(path, png.getvalue())
  return path
