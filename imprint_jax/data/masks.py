"""The four levels of shape guidance (IMPRINT Sec. 3.2, following SmartBrush).

Level 1 is the precise object mask and level 4 its bounding box; levels 2 and 3 are coarser
silhouettes in between, so that at inference a user may draw anything from an exact shape to a
box. The paper leaves the coarsening recipe to the appendix figure; ours is:

  level 1  the precise mask M.
  level 2  smooth dilated silhouette: M blurred with a Gaussian of standard deviation
           sigma = U(0.02, 0.06) * max(box width, box height) (at least 1 px), thresholded low
           at t = U(0.05, 0.2), united with M. Thin parts and concavities fill in, the outline
           grows by about one sigma and becomes smooth.
  level 3  "bulging box": the convex hull of level 2 united with a superellipse
           |x/a|^p + |y/b|^p <= 1 inscribed in the box, p = U(2.5, 6) (p = 2 an ellipse, large
           p the box). A rounded, box-like blob that still follows the object's extent.
  level 4  the box: the tight pixel box of M (clipped to the image by construction).

Every level is intersected with the box and united with the level below, so the nesting
L1 <= L2 <= L3 <= L4 holds exactly (pixel for pixel). All random draws come from the generator
passed in and are made up front, so calls with equally seeded generators give nested levels.
Work is confined to the box (padded by the blur's support), which keeps level 2/3 cheap on
512x512 crops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from imprint_jax.errors import UserError

LEVELS = (1, 2, 3, 4)


def sample_level(probs: Sequence[float], rng: np.random.Generator) -> int:
  """Draws a mask level in 1..4 with probabilities `probs` (4 non-negative weights)."""
  p = np.asarray(probs, np.float64)
  if p.shape != (4,) or (p < 0).any() or p.sum() <= 0:
    raise UserError(f"mask_level_probs={tuple(probs)}: expected 4 non-negative weights with a "
                    "positive sum, e.g. (0.25, 0.25, 0.25, 0.25)")
  return int(rng.choice(4, p=p / p.sum())) + 1


def _draws(rng: np.random.Generator) -> dict[str, float]:
  return {"sigma_frac": rng.uniform(0.02, 0.06), "threshold": rng.uniform(0.05, 0.2),
          "power": rng.uniform(2.5, 6.0)}


def mask_levels(mask: np.ndarray, rng: np.random.Generator, up_to: int = 4, *,
                box_only: bool = False) -> list[np.ndarray]:
  """All mask levels from 1 to `up_to`, nested.

  Args:
    mask: (H, W) or (H, W, 1), any dtype; non-zero = object.
    rng: source of the level-2/3 parameters.
    up_to: last level computed (1..4).
    box_only: skip levels 2 and 3 (their draws are still made); returns [level 1, box].

  Returns:
    `up_to` bool arrays of the input's shape, level 1 first.
  """
  if up_to not in LEVELS:
    raise UserError(f"mask level {up_to}: expected one of {LEVELS}")
  m = np.asarray(mask)
  shape = m.shape
  m = m.reshape(shape[0], shape[1]) > 0
  rows = np.flatnonzero(m.any(axis=1))
  if rows.size == 0:
    raise UserError("empty object mask: a mask level needs at least one object pixel")
  cols = np.flatnonzero(m.any(axis=0))
  y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  d = _draws(rng)

  crop1 = m[y0:y1, x0:x1]
  crops = [crop1]
  if up_to >= 2 and not box_only:
    sigma = max(1.0, d["sigma_frac"] * max(y1 - y0, x1 - x0))
    crops.append(crop1 | (_blur(crop1, sigma) > d["threshold"]))
  if up_to >= 3 and not box_only:
    crops.append(crops[-1] | _hull(crops[-1]) | _superellipse(crop1.shape, d["power"]))
  if up_to == 4:
    crops.append(np.ones_like(crop1))

  out = []
  for crop in crops:
    full = np.zeros_like(m)
    full[y0:y1, x0:x1] = crop
    out.append(full.reshape(shape))
  return out


def coarse_mask(mask: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
  """The mask at `level` (1 precise .. 4 box): bool, same shape as `mask` (non-zero = object)."""
  # The box contains every level: levels 2 and 3 need not be built for it.
  return mask_levels(mask, rng, up_to=level, box_only=level == 4)[-1]


def _blur(crop: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur (std `sigma` px) of a bool (h, w) crop that is zero outside: float32 (h, w).

  Large blurs run on a block-averaged copy (block ~ sigma / 3, so the kernel stays >= 3 px
  wide) and are upsampled bilinearly: the result differs from the full-resolution blur by far
  less than the threshold range, at a fraction of the cost on 512x512 crops.
  """
  k = max(1, int(sigma // 3))
  pad = int(np.ceil(3 * sigma / k)) * k
  # Zero padding is exact: the mask is zero outside its box.
  x = np.pad(crop.astype(np.float32), ((pad, pad + (-crop.shape[0]) % k),
                                       (pad, pad + (-crop.shape[1]) % k)))
  hp, wp = x.shape
  small = x.reshape(hp // k, k, wp // k, k).mean(axis=(1, 3))
  soft = ndimage.gaussian_filter(small, sigma / k, truncate=3.0, mode="constant")
  if k > 1:
    soft = np.asarray(Image.fromarray(soft, mode="F").resize((wp, hp), Image.Resampling.BILINEAR))
  return soft[pad:pad + crop.shape[0], pad:pad + crop.shape[1]]


def _hull(crop: np.ndarray) -> np.ndarray:
  """Filled convex hull of the pixels (as unit squares) of a bool (h, w) crop."""
  h, w = crop.shape
  # Hull vertices are extreme in their row: the first and last pixel of each row suffice;
  # their corners make every hull two-dimensional.
  rows = np.flatnonzero(crop.any(axis=1))
  first = crop[rows].argmax(axis=1)
  last = w - 1 - crop[rows, ::-1].argmax(axis=1)
  xs = np.concatenate([first, last]).astype(np.float64)
  ys = np.concatenate([rows, rows]).astype(np.float64)
  pts = np.concatenate([np.stack([xs + dx, ys + dy], axis=1)
                        for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
  try:
    poly = pts[ConvexHull(pts).vertices]
  except QhullError:
    return np.ones_like(crop)
  img = Image.new("1", (w, h), 0)
  ImageDraw.Draw(img).polygon([tuple(p) for p in poly], fill=1, outline=1)
  return np.asarray(img, dtype=bool)


def _superellipse(shape: tuple[int, int], power: float) -> np.ndarray:
  """|x/a|^p + |y/b|^p <= 1 inscribed in an (h, w) box, sampled at pixel centres."""
  h, w = shape
  y = (np.arange(h) + 0.5 - h / 2) / (h / 2)
  x = (np.arange(w) + 0.5 - w / 2) / (w / 2)
  return (np.abs(x)[None, :] ** power + np.abs(y)[:, None] ** power) <= 1.0
