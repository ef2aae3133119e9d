"""Reading the inputs of a job and writing its outputs: images and masks as numpy arrays.

Inputs are paths, PIL images or numpy arrays. EXIF orientation is applied; RGB, RGBA, LA,
grayscale (L), palette (P), 1-bit, CMYK and 16-bit ('I;16', 'I', uint16 arrays: scaled to 8
bits, v * 255 / 65535 rounded) all become 8-bit RGB plus an optional alpha channel. A mask pixel
is in when its brightest channel (times its alpha) is >= 128, or non-zero when the file only
holds 0/1 values. Outputs are written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imprint_jax.errors import UserError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def describe(src: Any) -> str:
  """How an input is named in error messages: its path, or its type for in-memory images."""
  return str(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"


def _open(src: ImageLike, role: str) -> Image.Image | np.ndarray:
  """A path/PIL image/array -> a loaded, upright PIL image (or the array itself)."""
  if isinstance(src, np.ndarray):
    return src
  if isinstance(src, Image.Image):
    img = src
  elif isinstance(src, (str, os.PathLike)):
    path = Path(src)
    if not path.exists():
      raise UserError(f"{role} {path}: no such file")
    if path.is_dir():
      raise UserError(f"{role} {path}: is a folder, not an image file")
    try:
      img = Image.open(path)
      img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as e:
      kind = "not an image file" if isinstance(e, UnidentifiedImageError) else "unreadable image"
      raise UserError(f"{role} {path}: {kind} ({type(e).__name__})") from None
  else:
    raise UserError(f"{role}: expected a path, a PIL image or a numpy array, got"
                    f" {type(src).__name__}")
  try:
    return ImageOps.exif_transpose(img)
  except (OSError, ValueError, SyntaxError):  # a broken EXIF block: use the pixels as stored
    return img


def _to_uint8(values: np.ndarray) -> np.ndarray:
  """Integer or float pixel values -> uint8: 16-bit ranges scaled, floats taken as [0, 1]."""
  v = np.asarray(values)
  if v.dtype == np.uint8:
    return v
  if v.dtype == bool:
    return v.astype(np.uint8) * 255
  if np.issubdtype(v.dtype, np.floating):
    v = np.nan_to_num(v.astype(np.float64))
    if v.size and v.max() > 1.0:  # already 0..255
      return np.clip(np.rint(v), 0, 255).astype(np.uint8)
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)
  v = v.astype(np.int64)
  # 16-bit data: uint16 arrays ('I;16' images), or 32-bit 'I' images with values above 255.
  if (values.dtype.kind == "u" and values.dtype.itemsize == 2) or (v.size and v.max() > 255):
    return ((np.clip(v, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
  return np.clip(v, 0, 255).astype(np.uint8)


def _pixels(img: Image.Image | np.ndarray, role: str, src: Any) -> tuple[np.ndarray,
                                                                          np.ndarray | None]:
  """-> (RGB (H, W, 3) uint8, alpha (H, W) uint8 or None)."""
  if isinstance(img, np.ndarray):
    a = img
    if a.ndim == 3 and a.shape[2] == 1:
      a = a[..., 0]
    if a.ndim == 2:
      g = _to_uint8(a)
      return np.repeat(g[..., None], 3, axis=2), None
    if a.ndim != 3 or a.shape[2] not in (2, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
      raise UserError(f"{role} {describe(src)}: array of shape {a.shape}; expected (H, W),"
                      " (H, W, 3) or (H, W, 4)")
    a = _to_uint8(a)
    if a.shape[2] == 2:
      return np.repeat(a[..., :1], 3, axis=2), a[..., 1]
    if a.shape[2] == 4:
      return np.ascontiguousarray(a[..., :3]), a[..., 3]
    return a, None
  mode = img.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    return _pixels(np.asarray(img), role, src)
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      mode in ("P", "L", "RGB") and "transparency" in img.info):
    rgba = np.asarray(img.convert("RGBA"))
    return np.ascontiguousarray(rgba[..., :3]), rgba[..., 3]
  return np.asarray(img if mode == "RGB" else img.convert("RGB")), None


def load_image(src: ImageLike, role: str = "image") -> tuple[np.ndarray, np.ndarray | None]:
  """An image as (RGB (H, W, 3) uint8, alpha (H, W) uint8 or None), EXIF orientation applied.

  `role` names the input in error messages ("background", "object image", ...).
  """
  return _pixels(_open(src, role), role, src)


def flatten_on_white(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
  """RGB (H, W, 3) uint8 composited over white by alpha (H, W) uint8 (unchanged if None)."""
  if alpha is None:
    return rgb
  a = alpha[..., None].astype(np.float32) / 255.0
  return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def load_mask(src: ImageLike, role: str = "mask") -> np.ndarray:
  """A mask as (H, W) bool, EXIF orientation applied.

  A pixel is in the mask when its brightest channel, scaled by its alpha if any, is >= 128
  (16-bit masks are first scaled to 8 bits, float arrays taken as [0, 1]); an integer mask
  holding only the values 0 and 1 counts every non-zero pixel. Boolean arrays are taken as
  they are.
  """
  img = _open(src, role)
  if isinstance(img, Image.Image) and img.mode in ("1", "L", "I;16", "I;16L", "I;16B",
                                                    "I;16N", "I", "F"):
    level = np.asarray(img)
  elif isinstance(img, np.ndarray) and (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1)):
    level = img.reshape(img.shape[:2])
  else:
    rgb, alpha = _pixels(img, role, src)
    level = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    if alpha is not None:
      level = ((level.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
  if level.dtype == bool:
    return level
  if level.size and np.issubdtype(level.dtype, np.integer) and level.max() <= 1:
    return level > 0
  return _to_uint8(level) >= 128


def save_image(image: np.ndarray, path: str | os.PathLike) -> Path:
  """Writes an image atomically (a temporary name in the same folder, then a rename)."""
  path = Path(path)
  fmt = image_format(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
  try:
    Image.fromarray(image).save(tmp, format=fmt)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def image_format(path: str | os.PathLike) -> str:
  """The PIL format for an output file name; UserError for an unknown extension."""
  suffix = Path(path).suffix.lower()
  fmt = Image.registered_extensions().get(suffix)
  if fmt is None or fmt not in Image.SAVE:
    raise UserError(f"output {path}: unknown image extension {suffix or '(none)'!r}; use .png"
                    " or .jpg")
  return fmt
