"""Job preparation on the host: inputs -> the crops the model sees and what the paste needs.

One job = an object image, a background and where the object goes (a mask or a box):
  1. Object: segmented by `object_mask`, else by its alpha channel (alpha >= 128), else the
     whole image is the object; pixels outside are set to `schema.OBJECT_FILL` (white), the
     box is centred on a white square and resized to E x E (`data.crops.object_crop`,
     exactly as the training pairs were made), ImageNet-normalised for DINOv2.
  2. Generation region (shape guidance, full resolution): a mask as given (level 1), or that
     mask coarsened to level 2..4 with `data.masks.coarse_mask` (seeded by the job's seed), or
     a box (level 4).
  3. Target crop: the square window of side context x (the mask box's longer side), shifted
     inside the frame (`data.crops.target_window`/`target_crop`, context 2.0 as in
     training), resized to G x G (Lanczos; the region bilinearly, thresholded at half).
No model is needed: `prepare` runs before (or while) the device works.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from imprint_jax.compositing.io import ImageLike, describe, flatten_on_white, load_image, load_mask
from imprint_jax.convert.checkpoint import (DEFAULT_CONTEXT, DEFAULT_ENCODER_SIZE,
                                            DEFAULT_GENERATOR_SIZE)
from imprint_jax.data import crops
from imprint_jax.data import masks as masks_lib
from imprint_jax.data.pipeline import normalize_object, normalize_target
from imprint_jax.errors import UserError

Box = tuple[int, int, int, int]

FEATHER_FRACTION = 0.02
MIN_FEATHER = 3.0
MAX_SEED = 2 ** 32


def parse_box(text: str) -> Box:
  """'x0,y0,x1,y1' (pixels, exclusive ends) -> a tuple of ints; UserError if malformed."""
  parts = [p.strip() for p in str(text).split(",")]
  try:
    values = tuple(int(round(float(p))) for p in parts)
  except ValueError:
    values = ()
  if len(values) != 4 or len(parts) != 4:
    raise UserError(f"box {text!r}: expected four numbers x0,y0,x1,y1 (pixels, x1/y1"
                    " exclusive), e.g. 120,80,360,400")
  return values  # type: ignore[return-value]


def check_box(box: Sequence[float], width: int, height: int) -> Box:
  """Validates a (x0, y0, x1, y1) box against a width x height image; returns ints."""
  if isinstance(box, str):
    box = parse_box(box)
  try:
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
  except (TypeError, ValueError):
    raise UserError(f"box {box!r}: expected four numbers x0,y0,x1,y1") from None
  if x1 <= x0 or y1 <= y0:
    raise UserError(f"box ({x0},{y0},{x1},{y1}) is empty: need x0 < x1 and y0 < y1")
  if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
    raise UserError(f"box ({x0},{y0},{x1},{y1}) lies outside the {width}x{height} background:"
                    f" need 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
  return x0, y0, x1, y1


# ---------------------------------------------------------------------------------------------
# Host-side preparation of one job.


@dataclasses.dataclass
class Prepared:
  """One job ready for the device (inputs at model size) and for pasting (full resolution).

  Attributes:
    background: (H, W, 3) uint8, the pixels the output keeps outside the region.
    region: (H, W) bool, the generation region (the mask at the chosen level).
    window: (x0, y0, side) of the target crop square in background pixels.
    object_crop: (E, E, 3) uint8, the segmented object as DINOv2 sees it (before normalising).
    object_in: (E, E, 3) float32, ImageNet-normalised object crop.
    target_in: (G, G, 3) float32 in [-1, 1], the background crop.
    mask_in: (G, G, 1) float32 in {0, 1}, the region in the crop.
    seed, num_samples: noise of sample k = fold_in(PRNGKey(seed), k).
    feather: width of the seam blend in background pixels.
    mask_level: 1 (precise) .. 4 (box).
  """
  background: np.ndarray
  region: np.ndarray
  window: tuple[int, int, int]
  object_crop: np.ndarray
  object_in: np.ndarray
  target_in: np.ndarray
  mask_in: np.ndarray
  seed: int
  num_samples: int
  feather: float
  mask_level: int


def default_feather(window_side: int) -> float:
  """The default seam width in background pixels: 2% of the crop window's side, >= 3 px."""
  return max(MIN_FEATHER, float(round(FEATHER_FRACTION * window_side)))


def prepare(object_image: ImageLike, background: ImageLike, *,
            object_mask: ImageLike | None = None, mask: ImageLike | None = None,
            box: Sequence[float] | str | None = None, mask_level: int | None = None,
            seed: int = 0, num_samples: int = 1, feather: float | None = None,
            encoder_size: int = DEFAULT_ENCODER_SIZE,
            generator_size: int = DEFAULT_GENERATOR_SIZE,
            context: float = DEFAULT_CONTEXT) -> Prepared:
  """Validates a job and makes its crops (no model needed); see the module docstring.

  Raises UserError with one line naming the bad input.
  """
  if (mask is None) == (box is None):
    raise UserError("give exactly one of a mask (the region to fill) or a box x0,y0,x1,y1")
  if mask_level is not None and mask_level not in masks_lib.LEVELS:
    raise UserError(f"mask level {mask_level!r}: expected one of 1, 2, 3, 4")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < MAX_SEED:
    raise UserError(f"seed {seed!r}: expected an integer in [0, 2**32)")
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise UserError(f"num_samples {num_samples!r}: must be a positive integer")
  if feather is not None and not (feather >= 0 and math.isfinite(feather)):
    raise UserError(f"feather {feather!r}: must be a number of pixels >= 0")
  if context < 1.0:
    raise UserError(f"context {context}: must be >= 1 (the crop contains the box)")

  bg_rgb, bg_alpha = load_image(background, "background")
  bg = flatten_on_white(bg_rgb, bg_alpha)
  height, width = bg.shape[:2]
  if mask is not None:
    user = load_mask(mask, "mask")
    if user.shape != (height, width):
      raise UserError(f"mask {describe(mask)}: size {user.shape[1]}x{user.shape[0]} differs"
                      f" from the background's {width}x{height}; it must match pixel for pixel")
    if not user.any():
      raise UserError(f"mask {describe(mask)} is empty: mark the region to fill in white"
                      " (values >= 128)")
    level = 1 if mask_level is None else int(mask_level)
    region = user if level == 1 else masks_lib.coarse_mask(user, level,
                                                            np.random.default_rng(seed))
  else:
    if mask_level not in (None, 4):
      raise UserError(f"mask level {mask_level} needs a mask: a box is shape guidance level 4")
    x0, y0, x1, y1 = check_box(box, width, height)
    level = 4
    region = np.zeros((height, width), bool)
    region[y0:y1, x0:x1] = True

  obj_rgb, obj_alpha = load_image(object_image, "object image")
  if object_mask is not None:
    obj_mask = load_mask(object_mask, "object mask")
    if obj_mask.shape != obj_rgb.shape[:2]:
      raise UserError(f"object mask {describe(object_mask)}: size {obj_mask.shape[1]}x"
                      f"{obj_mask.shape[0]} differs from the object image's"
                      f" {obj_rgb.shape[1]}x{obj_rgb.shape[0]}")
    if not obj_mask.any():
      raise UserError(f"object mask {describe(object_mask)} is empty: mark the object in white")
  elif obj_alpha is not None:
    obj_mask = obj_alpha >= 128
    if not obj_mask.any():
      raise UserError(f"object image {describe(object_image)}: its alpha channel is fully"
                      " transparent (no pixel with alpha >= 128); give --object-mask")
  else:
    obj_mask = np.ones(obj_rgb.shape[:2], bool)
  obj_crop, _ = crops.object_crop(flatten_on_white(obj_rgb, obj_alpha), obj_mask, encoder_size)

  window = crops.target_window(crops.bbox(region), width, height, context)
  try:
    target, target_mask, _ = crops.target_crop(bg, region, generator_size, context)
  except crops.BadFile:
    raise UserError(f"the {'mask' if mask is not None else 'box'} is too thin: nothing of it"
                    f" is left at the model's {generator_size}x{generator_size} crop; draw a"
                    " larger region") from None
  return Prepared(
      background=bg, region=region, window=window, object_crop=obj_crop,
      object_in=normalize_object(obj_crop[None])[0], target_in=normalize_target(target[None])[0],
      mask_in=(target_mask > 0).astype(np.float32), seed=int(seed),
      num_samples=int(num_samples),
      feather=default_feather(window[2]) if feather is None else float(feather),
      mask_level=level)
