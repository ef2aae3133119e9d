"""Shared pixel work for `imprint-jax prepare`: decoding, mask filters and the two crops.

Geometry (all boxes are (x0, y0, x1, y1) in pixels, x1/y1 exclusive):

* Object crop: pixels outside the object's mask are set to `schema.OBJECT_FILL`, the box is
  cut out and centred on a square canvas of side max(w, h) filled with OBJECT_FILL (mask 0),
  then resized to E x E (Lanczos for the image; the mask is resized bilinearly and
  thresholded at 128, so it stays 0/255).
* Target crop: a square of side s = clamp(round(context * max(w, h)), max(w, h), min(H, W))
  centred on the box centre. Along an axis where s fits in the frame the square is shifted
  (not shrunk) to lie inside the frame; it still contains the whole box. Only when the box
  itself is longer than the frame's short side (s = max(w, h) > min(H, W)) does the square
  overhang the frame on the short axis; the overhang is padded with 0 (black, mask 0). The
  crop is resized to G x G like the object crop, and the record's box is the tight box of
  the resized target mask divided by G.
* Test crop (DreamBooth): the same square around the given box of a background image; the
  target mask is the box rasterised in the crop (pixels whose centre lies in the box) and
  the record's box is the given box in crop coordinates divided by G.

Filters (config values, applied to an object's full-resolution mask): the mask must be
non-empty, its area fraction of the frame within [min_area, max_area], both box sides at
least min_size pixels, and its largest 8-connected component must hold at least
min_connected of its area (scipy.ndimage.label).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from imprint_jax.data import schema

Box = tuple[int, int, int, int]


class BadFile(Exception):
  """A file that cannot be used; `reason` is the summary key it is counted under."""

  def __init__(self, reason: str, path: str | os.PathLike = ""):
    super().__init__(f"{reason}: {path}")
    self.reason = reason
    self.path = os.fspath(path)


def _open(path: Path) -> Image.Image:
  try:
    return Image.open(path)
  except FileNotFoundError as e:
    raise BadFile("missing_file", path) from e
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise BadFile("corrupt_image", path) from e


def _oriented_size(img: Image.Image) -> tuple[int, int]:
  """(width, height) after EXIF orientation, read from the header only."""
  w, h = img.size
  try:
    orientation = img.getexif().get(0x0112, 1)
  except Exception:  # a broken EXIF block: treat as upright, like exif_transpose would fail
    orientation = 1
  return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def check_image(path: Path) -> tuple[int, int]:
  """Validates an image file cheaply and returns its (width, height) after EXIF orientation.

  JPEGs are decoded in draft mode (DCT-domain downscaling, ~10x cheaper than a full
  decode), which still reads every byte and so catches truncated files.
  Raises BadFile("corrupt_image" | "missing_file").
  """
  img = _open(path)
  try:
    size = _oriented_size(img)
    if img.format == "JPEG":
      img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
    img.load()
  except (OSError, ValueError, SyntaxError) as e:
    raise BadFile("corrupt_image", path) from e
  finally:
    img.close()
  return size


def has_alpha(path: Path) -> bool:
  """Whether an image file carries transparency (an alpha channel or a transparent colour)."""
  with _open(path) as img:
    return img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info


def load_image(path: Path, *, keep_alpha: bool = False) -> np.ndarray:
  """Decodes an image with EXIF orientation applied: (H, W, 3) uint8 (or (H, W, 4) RGBA)."""
  img = _open(path)
  try:
    img.load()
    img = ImageOps.exif_transpose(img)
    if keep_alpha:
      img = img.convert("RGBA")
    elif img.mode != "RGB":
      # Flatten transparency onto white so cut-outs keep their look.
      if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, rgba).convert("RGB")
      else:
        img = img.convert("RGB")
    return np.asarray(img).copy()
  except (OSError, ValueError, SyntaxError) as e:
    raise BadFile("corrupt_image", path) from e


def load_mask_values(path: Path, *, rgb_ids: bool = False) -> np.ndarray:
  """Raw values of a mask file, (H, W) integer array, EXIF orientation applied.

  Palette PNGs give their indices (YouTube-VOS), 16-bit PNGs their 16-bit values (VIPSeg
  panomasks), and with `rgb_ids` an RGB PNG gives COCO-panoptic ids R + 256 G + 256^2 B.
  Raises BadFile("missing_mask" | "corrupt_mask").
  """
  try:
    img = Image.open(path)
    img.load()
    img = ImageOps.exif_transpose(img)
  except FileNotFoundError as e:
    raise BadFile("missing_mask", path) from e
  except (OSError, ValueError, SyntaxError) as e:
    raise BadFile("corrupt_mask", path) from e
  if rgb_ids:
    rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
  if img.mode in ("RGB", "RGBA"):
    img = img.convert("L")  # a colour-coded binary mask: any non-black pixel is object
  elif img.mode == "LA":
    img = img.getchannel("L")
  values = np.asarray(img)
  if values.ndim != 2:
    raise BadFile("corrupt_mask", path)
  return values


def binary_mask(values: np.ndarray) -> np.ndarray:
  """Object mask of a binary mask file: >= 128 for 0..255 masks, nonzero for 0/1 masks."""
  threshold = 128 if values.max(initial=0) > 1 else 1
  return values >= threshold


def alpha_mask(rgba: np.ndarray) -> np.ndarray:
  """Object mask from an RGBA image's alpha channel (alpha >= 128)."""
  return rgba[..., 3] >= 128


def bbox(mask: np.ndarray) -> Box | None:
  """Tight box of a boolean (H, W) mask, (x0, y0, x1, y1) with exclusive ends; None if empty."""
  rows = np.flatnonzero(mask.any(axis=1))
  if rows.size == 0:
    return None
  cols = np.flatnonzero(mask.any(axis=0))
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def filter_reason(mask: np.ndarray, *, min_area: float, max_area: float, min_size: int,
                  min_connected: float) -> str | None:
  """Why an object mask is rejected (a summary key), or None if it passes every filter.

  Args:
    mask: (H, W) bool mask in the full frame.
    min_area, max_area: allowed range of the mask's area as a fraction of H * W.
    min_size: minimum side of the mask's box in pixels.
    min_connected: minimum share of the mask area held by its largest 8-connected component.
  """
  area = int(mask.sum())
  if area == 0:
    return "empty_mask"
  fraction = area / mask.size
  if fraction < min_area:
    return "area_too_small"
  if fraction > max_area:
    return "area_too_large"
  x0, y0, x1, y1 = bbox(mask)
  if min(x1 - x0, y1 - y0) < min_size:
    return "too_small"
  if min_connected > 0:
    labels, n = ndimage.label(mask[y0:y1, x0:x1], structure=np.ones((3, 3), bool))
    if n > 1:
      largest = np.bincount(labels.ravel())[1:].max()
      if largest < min_connected * area:
        return "disconnected"
  return None


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """(S, S) bool -> (size, size, 1) uint8 in {0, 255} (bilinear, threshold at half)."""
  m = Image.fromarray(mask.astype(np.uint8) * 255)
  if m.size != (size, size):
    m = m.resize((size, size), Image.Resampling.BILINEAR)
  return np.where(np.asarray(m) >= 128, 255, 0).astype(np.uint8)[..., None]


def _cut_square(image: np.ndarray, x0: int, y0: int, side: int, fill: int) -> np.ndarray:
  """The square [x0, x0 + side) x [y0, y0 + side) of `image`, padded with `fill` outside."""
  h, w = image.shape[:2]
  out = np.full((side, side) + image.shape[2:], fill, image.dtype)
  sx0, sy0 = max(x0, 0), max(y0, 0)
  sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
  if sx1 > sx0 and sy1 > sy0:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
  return out


def object_crop(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """The segmented object on OBJECT_FILL, square around its box, resized.

  Args:
    image: (H, W, 3) uint8 frame.
    mask: (H, W) bool object mask (non-empty).
    size: E, the output side.

  Returns:
    object (E, E, 3) uint8 and object_mask (E, E, 1) uint8 in {0, 255}.
  """
  x0, y0, x1, y1 = bbox(mask)
  side = max(x1 - x0, y1 - y0)
  sx0 = x0 - (side - (x1 - x0)) // 2
  sy0 = y0 - (side - (y1 - y0)) // 2
  # The box is tight, so every pixel of the square outside it is background: filled.
  cut_mask = _cut_square(mask, sx0, sy0, side, False)
  cut = _cut_square(image, sx0, sy0, side, schema.OBJECT_FILL)
  cut = np.where(cut_mask[..., None], cut, np.uint8(schema.OBJECT_FILL)).astype(np.uint8)
  return _resize_image(cut, size), _resize_mask(cut_mask, size)


def target_window(box: Box, width: int, height: int, context: float) -> tuple[int, int, int]:
  """The target crop square (x0, y0, side) around `box` in a width x height frame.

  See the module docstring for the rules (context factor, shift inside the frame, padding
  only when the box is longer than the frame's short side).
  """
  x0, y0, x1, y1 = box
  longest = max(x1 - x0, y1 - y0)
  side = max(longest, min(int(round(context * longest)), min(width, height)))

  def place(lo: int, hi: int, extent: int) -> int:
    start = int(np.floor((lo + hi) / 2 - side / 2))
    if side <= extent:
      start = min(max(start, 0), extent - side)
    return start

  return place(x0, x1, width), place(y0, y1, height), side


def target_crop(image: np.ndarray, mask: np.ndarray, size: int, context: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The target crop around an object, with its real background.

  Args:
    image: (H, W, 3) uint8 frame.
    mask: (H, W) bool object mask (non-empty).
    size: G, the output side.
    context: crop side / the box's longer side (clamped, see the module docstring).

  Returns:
    target (G, G, 3) uint8, target_mask (G, G, 1) uint8 in {0, 255}, box (4,) float32 =
    the tight box of target_mask / G. Raises BadFile("too_small") if the mask vanishes
    when resized.
  """
  h, w = mask.shape
  cx0, cy0, side = target_window(bbox(mask), w, h, context)
  tgt = _resize_image(_cut_square(image, cx0, cy0, side, 0), size)
  tgt_mask = _resize_mask(_cut_square(mask, cx0, cy0, side, False), size)
  box = bbox(tgt_mask[..., 0] > 0)
  if box is None:
    raise BadFile("too_small")
  return tgt, tgt_mask, np.asarray(box, np.float32) / size


def box_target_crop(image: np.ndarray, box: Box, size: int, context: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The test-pair target: background crop around `box`, box region as the mask.

  Args:
    image: (H, W, 3) uint8 background.
    box: (x0, y0, x1, y1) pixels in the background, exclusive ends.
    size: G, the output side.
    context: as in `target_crop`.

  Returns:
    target (G, G, 3) uint8, target_mask (G, G, 1) uint8 (the rasterised box), box (4,)
    float32 in [0, 1].
  """
  h, w = image.shape[:2]
  cx0, cy0, side = target_window(box, w, h, context)
  tgt = _resize_image(_cut_square(image, cx0, cy0, side, 0), size)
  scale = size / side
  bx = np.clip(np.array([(box[0] - cx0) * scale, (box[1] - cy0) * scale,
                         (box[2] - cx0) * scale, (box[3] - cy0) * scale]), 0, size)
  centres = np.arange(size) + 0.5
  inside_x = (centres >= bx[0]) & (centres < bx[2])
  inside_y = (centres >= bx[1]) & (centres < bx[3])
  tgt_mask = (inside_y[:, None] & inside_x[None, :]).astype(np.uint8)[..., None] * 255
  return tgt, tgt_mask, (bx / size).astype(np.float32)


class LRU:
  """A tiny least-recently-used cache for decoded frames within one group."""

  def __init__(self, capacity: int = 4):
    self.capacity = capacity
    self._items: collections.OrderedDict = collections.OrderedDict()

  def get(self, key, make):
    if key in self._items:
      self._items.move_to_end(key)
      return self._items[key]
    value = make()
    self._items[key] = value
    if len(self._items) > self.capacity:
      self._items.popitem(last=False)
    return value
