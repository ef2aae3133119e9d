"""Object compositing with a stage-2 IMPRINT model: `composite(...)` and `Compositor`.

    import imprint_jax
    images = imprint_jax.composite("runs/stage2", "dog.png", "park.jpg", box=(420, 300, 780, 700))

    comp = Compositor.from_checkpoint("runs/stage2")      # load once, composite many
    jobs = [comp.prepare(obj, bg, mask=m, seed=i) for i, (obj, bg, m) in enumerate(data)]
    results = comp.run(jobs, steps=50, guidance=5.0)     # per job its samples, (H, W, 3) uint8

One job = an object image, a background and where the object goes (a mask or a box). Host
work (numpy/PIL) prepares fixed-size crops; the device generates a whole batch of crops in one
jitted call; the host pastes each crop back into its background at full resolution. The parts:

  io         reading images and masks (EXIF orientation, 16-bit, alpha), atomic writes
  jobs       a job's validation and crops: object E x E, target window G x G, region level
  engine     the device side: the compiled batch program, rows sharded over the devices
  placement  the parameters' dtype and placement (replicated or split fsdp-style)
  paste      the feathered paste of a generated crop into the full-resolution background
The latent blending that keeps the background during sampling is `diffusion.blending`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from imprint_jax.compositing.engine import (DEFAULT_BATCH_SIZE, Engine, Pending, auto_dtype,
                                            check_stage2, sampler_memory)
from imprint_jax.compositing.io import (ImageLike, flatten_on_white, image_format, load_image,
                                        load_mask, save_image)
from imprint_jax.compositing.jobs import (DEFAULT_CONTEXT, DEFAULT_ENCODER_SIZE,
                                          DEFAULT_GENERATOR_SIZE, Box, Prepared, check_box,
                                          default_feather, parse_box, prepare)
from imprint_jax.compositing.paste import grid, paste, region_overlay
from imprint_jax.compositing.placement import (load_placed, param_shardings, place_params,
                                               state_bytes)
from imprint_jax.convert.checkpoint import settings_from_meta
from imprint_jax.diffusion import samplers
from imprint_jax.errors import UserError
from imprint_jax.models.imprint import Imprint, vae_factor

__all__ = [
    "Box", "Compositor", "DEFAULT_BATCH_SIZE", "DEFAULT_CONTEXT", "DEFAULT_ENCODER_SIZE",
    "DEFAULT_GENERATOR_SIZE", "Engine", "ImageLike", "Pending", "Prepared", "auto_dtype",
    "check_box", "check_sampling", "composite", "default_feather", "flatten_on_white", "grid",
    "image_format", "load_image", "load_mask", "param_shardings", "parse_box", "paste",
    "place_params", "prepare", "region_overlay", "sampler_memory", "save_image",
    "settings_from_meta", "state_bytes",
]


class Compositor(Engine):
  """A stage-2 model placed on the local devices (an `Engine`), with the sizes it was trained at.

  Build it once and call `run`/`composite` many times: the parameters stay on the devices and
  the compiled sampler is reused for every batch of the same shape.
  """

  def __init__(self, model: Imprint, *, encoder_size: int = DEFAULT_ENCODER_SIZE,
               generator_size: int = DEFAULT_GENERATOR_SIZE, context: float = DEFAULT_CONTEXT,
               prediction_type: str = "epsilon", dtype: str | None = None,
               devices: Sequence[jax.Device] | None = None, param_dtype: str | None = None,
               shard_params: str = "auto"):
    """Args:
      model: a stage-2 `Imprint` (9-channel UNet).
      encoder_size, generator_size: E and G of training (`from_checkpoint` reads them).
      context: target window side / box side (training's `prepare --context`).
      prediction_type, dtype, devices, param_dtype, shard_params: see `Engine`.
    """
    check_stage2(model)
    factor = vae_factor(model.cfg.vae) * 2 ** (len(model.cfg.unet.block_out_channels) - 1)
    if generator_size % factor:
      raise UserError(f"generator size {generator_size} is not a multiple of {factor} (VAE"
                      " factor x UNet downsampling)")
    if encoder_size < model.cfg.dinov2.patch_size:
      raise UserError(f"encoder size {encoder_size} is smaller than DINOv2's patch size"
                      f" {model.cfg.dinov2.patch_size}")
    self.encoder_size = int(encoder_size)
    self.generator_size = int(generator_size)
    self.context = float(context)
    self.latent_factor = vae_factor(model.cfg.vae)
    self.latent_channels = model.cfg.vae.latent_channels
    super().__init__(model, prediction_type=prediction_type, dtype=dtype, devices=devices,
                     param_dtype=param_dtype, shard_params=shard_params)

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, *, dtype: str | None = None,
                      devices: Sequence[jax.Device] | None = None,
                      param_dtype: str | None = None, shard_params: str = "auto",
                      **sizes: Any) -> "Compositor":
    """Loads a stage-2 checkpoint (or training workdir); E, G, context and prediction type
    come from its metadata when recorded there, else the defaults (or `sizes` overrides).
    The parameters are restored straight into their final dtype and placement (no float32
    copy on one device first); `param_dtype`, `shard_params`: see `Engine`."""
    model, meta = load_placed(path, dtype=dtype or auto_dtype(), devices=devices,
                              param_dtype=param_dtype, shard_params=shard_params)
    kw = settings_from_meta(meta)
    kw.update({k: v for k, v in sizes.items() if v is not None})
    return cls(model, dtype=dtype, devices=devices, param_dtype=param_dtype,
               shard_params=shard_params, **kw)

  def prepare(self, object_image: ImageLike, background: ImageLike, **kw: Any) -> Prepared:
    """`jobs.prepare` at this model's E, G and context."""
    return prepare(object_image, background, encoder_size=self.encoder_size,
                   generator_size=self.generator_size, context=self.context, **kw)

  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, C) of one row's initial noise (`latents=`), NHWC."""
    side = self.generator_size // self.latent_factor
    return side, side, self.latent_channels

  def run(self, jobs: Sequence[Prepared], *, steps: int = 50, guidance: float = 5.0,
          sampler: str = "ddim", batch_size: int | None = None,
          latents: np.ndarray | None = None) -> list[list[np.ndarray]]:
    """Generates every sample of every job; returns per job its samples, each (H, W, 3) uint8
    at the job's background resolution. Rows of all jobs share device batches.

    `latents`: optional initial noise, NHWC (R, h, w, C) with one row per sample (jobs in
    order, each job's samples in order; see `latent_shape`), instead of the seeds' noise. The
    PyTorch pipeline's NCHW `latents=` transposed to NHWC give the same composite.
    """
    check_sampling(steps, guidance, sampler)
    rows = [(j, k) for j, p in enumerate(jobs) for k in range(p.num_samples)]
    if latents is not None:
      latents = np.asarray(latents, np.float32)
      if latents.shape != (len(rows), *self.latent_shape()):
        raise UserError(f"latents of shape {latents.shape}: expected"
                        f" {(len(rows), *self.latent_shape())} (one NHWC row per sample)")
    if not rows:
      return []
    batch = self.batch_rows(batch_size, len(rows))
    results: list[list[np.ndarray]] = [[] for _ in jobs]
    chunks = [rows[i:i + batch] for i in range(0, len(rows), batch)]

    def submit(i):
      chunk = chunks[i]
      return self.submit([(jobs[j], k) for j, k in chunk], batch=batch, steps=steps,
                         guidance=guidance, sampler=sampler,
                         latents=None if latents is None else latents[i * batch:i * batch
                                                                      + len(chunk)])

    pending = submit(0)
    for i, chunk in enumerate(chunks):
      crops_n = pending.result()
      if i + 1 < len(chunks):  # keep the device busy while the host pastes
        pending = submit(i + 1)
      for (j, _), crop in zip(chunk, crops_n):
        p = jobs[j]
        results[j].append(paste(p.background, crop, p.window, p.region, p.feather))
    return results


def check_sampling(steps: int, guidance: float, sampler: str) -> None:
  """UserError for bad sampling settings (before any model work)."""
  if sampler not in samplers.SAMPLERS:
    raise UserError(f"sampler {sampler!r}: expected one of {', '.join(samplers.SAMPLERS)}")
  if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= 1000:
    raise UserError(f"steps {steps!r}: expected an integer in 1..1000")
  samplers.timesteps(sampler, int(steps))
  if not (isinstance(guidance, (int, float, np.floating)) and math.isfinite(guidance)
          and guidance >= 0):
    raise UserError(f"guidance {guidance!r}: expected a number >= 0 (1 = no guidance)")


def composite(model: Imprint | Compositor | str | os.PathLike, object_image: ImageLike,
              background: ImageLike, *, object_mask: ImageLike | None = None,
              mask: ImageLike | None = None, box: Sequence[float] | str | None = None,
              mask_level: int | None = None, steps: int = 50, guidance: float = 5.0,
              seed: int = 0, num_samples: int = 1, sampler: str = "ddim",
              feather: float | None = None, encoder_size: int | None = None,
              generator_size: int | None = None, context: float | None = None,
              prediction_type: str | None = None, batch_size: int | None = None,
              latents: np.ndarray | None = None, param_dtype: str | None = None,
              shard_params: str | None = None) -> list[np.ndarray]:
  """Composites an object into a background with a stage-2 IMPRINT model.

  Args:
    model: a stage-2 `Imprint`, a `Compositor`, or a checkpoint folder / training workdir.
    object_image: the object (path, PIL image or array); its alpha channel segments it
      unless `object_mask` is given; without either the whole image is the object.
    background: the image to composite into.
    object_mask: (H_o, W_o) mask of the object in `object_image`.
    mask: (H, W) region to fill, same size as the background (shape guidance level 1).
    box: (x0, y0, x1, y1) region to fill in background pixels, x1/y1 exclusive (level 4).
    mask_level: 1..4; levels 2-4 coarsen `mask` (data.masks.coarse_mask); default 1 for a
      mask, 4 for a box.
    steps, guidance, sampler: sampling ('ddim' or 'dpmpp_2m'); guidance 1 = no CFG.
    seed: sample k uses noise fold_in(PRNGKey(seed), k) (also seeds the mask coarsening).
    num_samples: samples generated (in one device batch where they fit).
    feather: seam width in background pixels (default 2% of the crop side, >= 3 px).
    encoder_size, generator_size, context, prediction_type: override the model's (defaults:
      224, 512, 2.0, 'epsilon', or the checkpoint's recorded values).
    batch_size: rows per device call (default min(num_samples, 8), rounded up to the devices).
    latents: optional initial noise, NHWC (num_samples, G/8, G/8, 4) float32, instead of the
      seed's (the PyTorch pipeline's NCHW `latents=`, transposed, give the same composite).
    param_dtype, shard_params: the parameters' dtype ('float32', 'bfloat16'; default as
      stored) and placement ('auto' (default), 'always', 'never'), see `Compositor`; for a
      model or a checkpoint path (a Compositor has them already).

  Returns:
    `num_samples` uint8 arrays (H, W, 3) at the background's full resolution.
  """
  check_sampling(steps, guidance, sampler)
  overrides = {"encoder_size": encoder_size, "generator_size": generator_size,
               "context": context, "prediction_type": prediction_type}
  param_kw = {"param_dtype": param_dtype, "shard_params": shard_params or "auto"}
  if isinstance(model, Compositor):
    comp = model
    if any(v is not None for v in (*overrides.values(), param_dtype, shard_params)):
      raise UserError("give encoder_size/generator_size/context/prediction_type/param_dtype/"
                      "shard_params to the Compositor, not to composite()")
  elif isinstance(model, Imprint):
    comp = Compositor(model, **param_kw,
                      **{k: v for k, v in overrides.items() if v is not None})
  elif isinstance(model, (str, os.PathLike)):
    comp = Compositor.from_checkpoint(model, **param_kw, **overrides)
  else:
    raise UserError(f"model: expected an Imprint, a Compositor or a checkpoint path, got"
                    f" {type(model).__name__}")
  job = comp.prepare(object_image, background, object_mask=object_mask, mask=mask, box=box,
                     mask_level=mask_level, seed=seed, num_samples=num_samples,
                     feather=feather)
  batch = batch_size or min(num_samples, DEFAULT_BATCH_SIZE)
  return comp.run([job], steps=steps, guidance=guidance, sampler=sampler, batch_size=batch,
                  latents=latents)[0]
