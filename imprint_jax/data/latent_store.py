"""Precomputed VAE latents for stage 2: the folder `imprint-jax encode-latents` writes and the
stage-2 pipeline reads (`data.latents`).

The VAE is frozen, so the posterior N(mean, exp(logvar)) of an image depends on the image
alone. A stage-2 step encodes two images per pair: the target and the masked background
(target * (1 - mask)). What is cached, and the trade:

  target             its posterior, once per pair. Stage 2 does not alter the target, so
                     this is exactly what the step would compute.
  masked background  its posterior for each stored mask variant, with the mask itself. The
                     masked background depends on the mask, and the mask on a random level
                     and, at levels 2 and 3, on random draws (`imprint_jax.data.masks`).
                     Stored: level 1 (the precise mask) and level 4 (the box), which have no
                     draws, once each; levels 2 and 3 in `mask_draws` draws each; only the
                     levels with a positive `mask_level_probs` at encoding time. A step draws
                     the level with the run's `mask_level_probs`, as the pixel path does, and
                     one of that level's stored draws uniformly: levels 1 and 4 are exact,
                     levels 2 and 3 see `mask_draws` shapes per pair instead of a fresh one per
                     step. Nothing else of the background is random in stage 2 (the object
                     perturbation changes the object image only), so a change there (e.g. a
                     background augmentation) needs a new encoding.

Only the posterior is stored, never a sample: the step draws z = mean + exp(logvar / 2) * eps
with its own per-sample key, exactly as the pixel path does after running the encoder, so
training stays as stochastic as before. Moments are stored in float16 (relative rounding
5e-4: on the SD VAE's means of magnitude ~10 that is of the order of the posterior's own
standard deviation, and far below the diffusion noise the UNet sees).

  <folder>/manifest.json     written last: format, generator_size, latent (h, w, 2C), dtype,
                             levels (the mask level of each stored variant), mask_draws,
                             mask_level_probs, seed, init, and per data source its folder and
                             split sizes. A folder without it is incomplete.
  <folder>/probe.npy         the VAE's (h, w, 2C) float32 moments of `probe_image`: `train`
                             recomputes them with its own VAE and refuses latents that another
                             VAE made
  <folder>/source-00/train.array_record-00000-of-00002
                             one record per pair of data source 0's split, in the order of the
                             source's records (`token_store.pack_record`): pair_id, the
                             target's (h, w, 2C) float16 moments [mean, logvar], the masked
                             backgrounds' (V, h, w, 2C) float16 moments, the V masks as
                             (V, ceil(G * G / 8)) packed bits; one file per encoding process
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from imprint_jax.data import masks as masks_lib
from imprint_jax.data import token_store
from imprint_jax.errors import UserError

FORMAT = 1
DTYPE = np.dtype("<f2")
KEY = "data.latents"
COMMAND = "encode-latents"


def probe_image(generator_size: int) -> np.ndarray:
  """A fixed (1, G, G, 3) float32 input in [-1, 1] (the VAE's input range)."""
  g = np.random.default_rng(20240618)
  return g.uniform(-1, 1, (1, generator_size, generator_size, 3)).astype(np.float32)


def variant_levels(mask_level_probs: Sequence[float], mask_draws: int) -> tuple[int, ...]:
  """The mask level of each stored variant: 1 and 4 once, 2 and 3 `mask_draws` times, the
  levels with zero probability left out."""
  masks_lib.sample_level(mask_level_probs, np.random.default_rng(0))  # validates the weights
  counts = {1: 1, 2: mask_draws, 3: mask_draws, 4: 1}
  return tuple(level for level in masks_lib.LEVELS if mask_level_probs[level - 1] > 0
               for _ in range(counts[level]))


def pick_variant(levels: Sequence[int], mask_level_probs: Sequence[float],
                 rng: np.random.Generator) -> int:
  """A stored variant: its level drawn with `mask_level_probs`, then one of its draws."""
  level = masks_lib.sample_level(mask_level_probs, rng)
  candidates = [j for j, l in enumerate(levels) if l == level]
  if not candidates:
    raise UserError(f"mask level {level} has no stored latents (stored: levels"
                    f" {sorted(set(levels))}); rerun `imprint-jax {COMMAND}`")
  return candidates[int(rng.integers(len(candidates)))]


def latent_mask(mask_GG1: np.ndarray, factor: int) -> np.ndarray:
  """A (G, G, 1) {0, 1} mask -> (G/f, G/f, 1) float32, max over f x f cells (as
  `imprint_jax.models.imprint.mask_to_latent`)."""
  g = mask_GG1.shape[0]
  m = np.asarray(mask_GG1, np.float32).reshape(g // factor, factor, g // factor, factor, 1)
  return m.max(axis=(1, 3))


def load_manifest(folder: str | os.PathLike) -> dict[str, Any]:
  def derive(m):
    m["latent"] = tuple(int(x) for x in m["latent"])
    m["levels"] = tuple(int(x) for x in m["levels"])
    if len(m["latent"]) != 3 or not m["levels"] or int(m["generator_size"]) < 1:
      raise ValueError("bad latent shape, levels or generator_size")
  return token_store.read_manifest(folder, FORMAT, KEY, COMMAND, derive)


def write_manifest(folder: str | os.PathLike, *, generator_size: int,
                   latent: tuple[int, int, int], levels: Sequence[int], **info: Any):
  """Writes `folder`/manifest.json (atomically); `info`: seed, sources, ... (JSON-able)."""
  return token_store.write_json_manifest(folder, {
      "format": FORMAT, "generator_size": generator_size, "latent": list(latent),
      "levels": list(levels), "dtype": DTYPE.name, **info})


def fields(manifest: dict[str, Any]) -> list[tuple[tuple[int, ...], np.dtype]]:
  """The (shape, dtype) of each array of a record (`token_store.pack_record`)."""
  v, g = len(manifest["levels"]), int(manifest["generator_size"])
  return [(manifest["latent"], DTYPE), ((v, *manifest["latent"]), DTYPE),
          ((v, -(-g * g // 8)), np.dtype(np.uint8))]


def encode_record(pair_id: int, target_moments: np.ndarray, background_moments: np.ndarray,
                  masks_VGG1: np.ndarray) -> bytes:
  packed = np.packbits(np.asarray(masks_VGG1, bool).reshape(masks_VGG1.shape[0], -1), axis=1)
  return token_store.pack_record(pair_id, [np.asarray(target_moments, DTYPE),
                                           np.asarray(background_moments, DTYPE), packed])


class LatentSource(token_store.RecordSource):
  """One source's latent records of one split: `decode` gives a dict of the pair's target
  moments (h, w, 2C) f16, masked-background moments (V, h, w, 2C) f16, masks (V, G, G, 1)
  uint8 {0, 1}, and `levels`, `factor` (the VAE's downsampling)."""
  what = "latents"
  command = COMMAND

  def __init__(self, folder: str, index: int, data_dir: str, split: str):
    manifest = load_manifest(folder)
    super().__init__(folder, manifest, index, data_dir, split)
    self.fields = fields(manifest)
    self.levels = manifest["levels"]
    self.size = int(manifest["generator_size"])
    self.factor = self.size // manifest["latent"][0]

  def decode(self, payload: bytes, pair_id: int) -> dict[str, Any]:
    target, background, packed = self.unpack(payload, pair_id, self.fields)
    g = self.size
    masks = np.unpackbits(packed, axis=1, count=g * g).reshape(len(self.levels), g, g, 1)
    return {"target_moments": target, "masked_target_moments": background, "masks": masks,
            "levels": self.levels, "factor": self.factor}
