"""Output assembly on the host: a generated crop pasted back into its full-resolution background.

The G x G result is resized back to the job's window and blended into the background with
alpha = clip(1 - d / feather, 0, 1), d = the Euclidean distance (px) to the region (0 inside
it). Inside the region the output is the generated pixels; a pixel farther than `feather` px
from the region (or outside the window) keeps the background's pixel exactly.

This seam blend works on pixels after decoding, once per output; the latent blending that keeps
the background during sampling is a diffusion step (`diffusion.blending`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage

from imprint_jax.compositing.jobs import Prepared
from imprint_jax.data import crops


def paste(background: np.ndarray, crop: np.ndarray, window: tuple[int, int, int],
          region: np.ndarray, feather: float) -> np.ndarray:
  """Blends a generated crop into the background at full resolution.

  Args:
    background: (H, W, 3) uint8.
    crop: (G, G, 3) uint8, the generated target crop.
    window: (x0, y0, side) of the crop in background pixels (may overhang the frame).
    region: (H, W) bool, the generation region; it lies inside the window.
    feather: seam width in pixels; alpha = clip(1 - distance to the region / feather, 0, 1).

  Returns:
    (H, W, 3) uint8: the crop inside the region, the background exactly wherever alpha is 0
    (farther than `feather` from the region, or outside the window).
  """
  height, width = background.shape[:2]
  x0, y0, side = window
  out = background.copy()
  bx0, by0, bx1, by1 = crops.bbox(region)
  grow = int(math.ceil(feather))
  sx0, sy0 = max(bx0 - grow, x0, 0), max(by0 - grow, y0, 0)
  sx1, sy1 = min(bx1 + grow, x0 + side, width), min(by1 + grow, y0 + side, height)
  if sx1 <= sx0 or sy1 <= sy0:
    return out
  inside = region[sy0:sy1, sx0:sx1]
  if feather > 0:
    # Every region pixel lies inside this sub-window, so distances computed in it are exact.
    alpha = np.clip(1.0 - ndimage.distance_transform_edt(~inside) / feather, 0.0, 1.0)
  else:
    alpha = inside.astype(np.float64)
  g = crop.shape[0]
  scale = g / side
  src_box = ((sx0 - x0) * scale, (sy0 - y0) * scale, (sx1 - x0) * scale, (sy1 - y0) * scale)
  gen = np.asarray(Image.fromarray(crop).resize((sx1 - sx0, sy1 - sy0),
                                                Image.Resampling.LANCZOS, box=src_box))
  bg = out[sy0:sy1, sx0:sx1]
  a = alpha[..., None]
  mixed = np.rint(bg * (1.0 - a) + gen * a).astype(np.uint8)
  out[sy0:sy1, sx0:sx1] = np.where(a > 0, mixed, bg)
  return out


def region_overlay(background: np.ndarray, region: np.ndarray) -> np.ndarray:
  """The background with the region tinted red and outlined, (H, W, 3) uint8 (for grids)."""
  out = background.astype(np.float32)
  tint = np.array([255.0, 0.0, 0.0], np.float32)
  out[region] = 0.6 * out[region] + 0.4 * tint
  edge = ndimage.binary_dilation(region) & ~region
  out[edge] = tint
  return np.rint(out).astype(np.uint8)


def grid(prepared: Prepared, result: np.ndarray, height: int = 256) -> np.ndarray:
  """Side-by-side object | background with the region | composite, (height, W, 3) uint8."""
  def fit(img: np.ndarray, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    w = max(1, round(img.shape[1] * height / img.shape[0]))
    return np.asarray(Image.fromarray(img).resize((w, height), resample))
  # Overlay at grid size: cheap on large backgrounds, and the outline stays 1 px wide.
  region = fit(prepared.region.astype(np.uint8) * 255, Image.Resampling.NEAREST) > 0
  gap = np.full((height, 4, 3), 255, np.uint8)
  cells = [fit(prepared.object_crop), gap, region_overlay(fit(prepared.background), region),
           gap, fit(result)]
  return np.concatenate(cells, axis=1)
