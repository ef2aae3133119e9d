"""Object compositing with a stage-2 IMPRINT model: `composite(...)` and the batched engine.

One job = an object image, a background and where the object goes (a mask or a box). Host
work (numpy/PIL) prepares fixed-size crops; the device generates a whole batch of crops in one
jitted call; the host pastes each crop back into its background at full resolution.

  1. Inputs: paths, PIL images or numpy arrays. EXIF orientation is applied; RGB, RGBA, LA,
     grayscale (L), palette (P), 1-bit, CMYK and 16-bit ('I;16', 'I', uint16 arrays: scaled
     to 8 bits, v * 255 / 65535 rounded) all become 8-bit RGB. A transparent background is
     flattened onto white.
  2. Object: segmented by `object_mask`, else by its alpha channel (alpha >= 128), else the
     whole image is the object; pixels outside are set to `schema.OBJECT_FILL` (white), the
     box is centred on a white square and resized to E x E (`data.crops.object_crop`,
     exactly as the training pairs were made), ImageNet-normalised for DINOv2.
  3. Generation region (shape guidance, full resolution): a mask as given (level 1), or that
     mask coarsened to level 2..4 with `data.masks.coarse_mask` (seeded by the job's seed), or
     a box (level 4). Masks: a pixel is in when its brightest channel (times its alpha) is
     >= 128, or non-zero when the file only holds 0/1 values.
  4. Target crop: the square window of side context x (the mask box's longer side), shifted
     inside the frame (`data.crops.target_window`/`target_crop`, context 2.0 as in
     training), resized to G x G (Lanczos; the region bilinearly, thresholded at half).
  5. Device: `generate.composite_latents` (classifier-free guidance, background latent
     blending at every step) + VAE decode, all rows of a batch at once, sharded over the local
     devices; the noise of sample k of a job is drawn from fold_in(PRNGKey(seed), k) alone, so
     a job's result does not depend on the other rows of its batch (or given: `latents=`).
  6. Paste: the G x G result is resized back to the window and blended into the background
     with alpha = clip(1 - d / feather, 0, 1), d = the Euclidean distance (px) to the region
     (0 inside it). Inside the region the output is the generated pixels; a pixel farther
     than `feather` px from the region (or outside the window) keeps the background's pixel
     exactly. Default feather: max(3, round(0.02 x the window side)) background pixels.

Compute dtype: bfloat16 on GPU/TPU, float32 on CPU. Parameters: float32 as stored, or cast
once at load to `param_dtype='bfloat16'` (half the memory); a full copy on every device, or
split over the devices (`shard_params`, fsdp-style, for a model that does not fit one device:
each large weight split along one logical axis and gathered where it is used, the batch still
split over all devices). The jitted function is cached per (model architecture, devices,
placement, steps, sampler, guidance on/off) and jax.jit caches per batch shape: repeated calls
with the same shapes do not retrace.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage

from imprint_jax.data import crops
from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.parallel import cpu_runtime
from imprint_jax.diffusion import generate
from imprint_jax.diffusion import samplers
from imprint_jax.data import masks as masks_lib
from imprint_jax.data.pipeline import normalize_object, normalize_target
from imprint_jax.errors import UserError
from imprint_jax.models.imprint import Imprint, ImprintConfig, vae_factor
from imprint_jax.models import layers
from imprint_jax.parallel import sharding

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
Box = tuple[int, int, int, int]

DEFAULT_ENCODER_SIZE = 224
DEFAULT_GENERATOR_SIZE = 512
DEFAULT_CONTEXT = 2.0
DEFAULT_BATCH_SIZE = 8
FEATHER_FRACTION = 0.02
MIN_FEATHER = 3.0
MAX_SEED = 2 ** 32


# ---------------------------------------------------------------------------------------------
# Reading images and masks.


def _describe(src: Any) -> str:
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
      raise UserError(f"{role} {_describe(src)}: array of shape {a.shape}; expected (H, W),"
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
      raise UserError(f"mask {_describe(mask)}: size {user.shape[1]}x{user.shape[0]} differs"
                      f" from the background's {width}x{height}; it must match pixel for pixel")
    if not user.any():
      raise UserError(f"mask {_describe(mask)} is empty: mark the region to fill in white"
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
      raise UserError(f"object mask {_describe(object_mask)}: size {obj_mask.shape[1]}x"
                      f"{obj_mask.shape[0]} differs from the object image's"
                      f" {obj_rgb.shape[1]}x{obj_rgb.shape[0]}")
    if not obj_mask.any():
      raise UserError(f"object mask {_describe(object_mask)} is empty: mark the object in white")
  elif obj_alpha is not None:
    obj_mask = obj_alpha >= 128
    if not obj_mask.any():
      raise UserError(f"object image {_describe(object_image)}: its alpha channel is fully"
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


# ---------------------------------------------------------------------------------------------
# Pasting back.


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


# ---------------------------------------------------------------------------------------------
# The device side.


def auto_dtype() -> str:
  """bfloat16 on accelerators, float32 on CPU (where bfloat16 is slow and less exact)."""
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


_GRAPHDEFS: dict[ImprintConfig, Any] = {}
_RUNNERS: dict[tuple, Any] = {}
TRACE_COUNT = {"n": 0}  # incremented each time the device function is traced (tests)


def _graphdef_for(cfg: ImprintConfig):
  if cfg not in _GRAPHDEFS:
    abstract = nnx.eval_shape(lambda: Imprint(cfg, rngs=layers.init_rngs(0)))
    _GRAPHDEFS[cfg] = nnx.split(abstract)[0]
  return _GRAPHDEFS[cfg]


def _runner(graphdef, mesh: Mesh, num_steps: int, sampler: str, prediction_type: str,
            use_cfg: bool, given_latents: bool = False, state_shardings: Any = None):
  """The jitted batch function (one per static setting; jax.jit caches per shape).

  `state_shardings`: the parameters' placement (a pure dict of NamedShardings, a function of
  graphdef and mesh: see `param_shardings`); None: replicated."""
  key = (graphdef, mesh, num_steps, sampler, prediction_type, use_cfg, given_latents,
         state_shardings is not None)
  if key in _RUNNERS:
    return _RUNNERS[key]
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  repl = NamedSharding(mesh, P())
  state_in = repl if state_shardings is None else state_shardings

  def run(state, object_BEE3, target_BGG3, mask_BGG1, seeds_B, sample_B, guidance, latents):
    TRACE_COUNT["n"] += 1
    model = nnx.merge(graphdef, state)
    keys_B2 = jax.vmap(lambda s, k: jax.random.fold_in(jax.random.PRNGKey(s), k))(
        seeds_B, sample_B)
    z = generate.composite_latents(
        model, object_BEE3, target_BGG3, mask_BGG1, keys_B2, num_steps=num_steps,
        guidance=guidance if use_cfg else 1.0, sampler=sampler,
        prediction_type=prediction_type, blend=True,
        x_T=latents if given_latents else None)
    x = generate.decode_latent(model, z)
    return jnp.floor((x + 1.0) * 127.5 + 0.5).astype(jnp.uint8)

  target = mesh.devices.flat[0].platform
  cpu_runtime.on_platform(target)
  fn = jax.jit(run, in_shardings=(state_in, rows, rows, rows, rows, rows, repl,
                                  rows if given_latents else repl),
               out_shardings=rows, compiler_options=layers.compiler_options(target))
  _RUNNERS[key] = fn
  return fn


@dataclasses.dataclass
class Pending:
  """A dispatched device batch; `result()` waits for it: (n, G, G, 3) uint8."""
  out: jax.Array
  n: int

  def result(self) -> np.ndarray:
    return np.asarray(jax.device_get(self.out))[:self.n]


class Compositor:
  """A stage-2 model placed on the local devices, with the sizes it was trained at.

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
      prediction_type: the UNet's output, 'epsilon' or 'v_prediction'.
      dtype: compute dtype; None: bfloat16 on GPU/TPU, float32 on CPU.
      devices: the devices the batch is split over (default: all local devices).
      param_dtype: 'float32' or 'bfloat16': the parameters are cast to it once, here (None:
        as given; checkpoints hold float32). bfloat16 halves their memory.
      shard_params: 'never' (a full copy on every device), 'always' (each large weight split
        over the devices, fsdp-style: `param_shardings`), or 'auto' (split when the
        parameters take more than half of one device's memory; never on CPU).
    """
    if not isinstance(model, Imprint):
      raise UserError(f"expected an imprint_jax Imprint model, got {type(model).__name__}")
    if model.cfg.stage != 2:
      raise UserError(f"a stage-{model.cfg.stage} model (UNet with"
                      f" {model.cfg.unet.in_channels} input channels); compositing needs a"
                      " stage-2 model (9 input channels)")
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
    self.prediction_type = prediction_type
    self.dtype = dtype or auto_dtype()
    self.latent_factor = vae_factor(model.cfg.vae)
    self.latent_channels = model.cfg.vae.latent_channels
    # Remat policies only matter under a gradient: inference runs without them.
    cfg = model.cfg.with_dtype(self.dtype, remat="none")
    graphdef, state = nnx.split(model)
    if cfg != model.cfg:
      graphdef = _graphdef_for(cfg)
    self.graphdef = graphdef
    devices = list(devices or jax.local_devices())
    self.param_dtype = check_param_dtype(param_dtype)
    self.sharded = shard_decision(shard_params, state_bytes(state, self.param_dtype), devices)
    self.mesh = inference_mesh(devices, self.sharded)
    # plain dicts: JAX flattens them in C++ on every call (nnx.Variables: one Python call each)
    self.state_shardings = param_shardings(cfg, self.mesh) if self.sharded else None
    self.state = place_params(nnx.to_pure_dict(state), self.mesh, self.state_shardings,
                              self.param_dtype)

  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, *, dtype: str | None = None,
                      devices: Sequence[jax.Device] | None = None,
                      param_dtype: str | None = None, shard_params: str = "auto",
                      **sizes: Any) -> "Compositor":
    """Loads a stage-2 checkpoint (or training workdir); E, G, context and prediction type
    come from its metadata when recorded there, else the defaults (or `sizes` overrides).
    The parameters are restored straight into their final dtype and placement (no float32
    copy on one device first); `param_dtype`, `shard_params`: see `__init__`."""
    model, meta = load_placed(path, dtype=dtype or auto_dtype(), devices=devices,
                              param_dtype=param_dtype, shard_params=shard_params)
    kw = settings_from_meta(meta)
    kw.update({k: v for k, v in sizes.items() if v is not None})
    return cls(model, dtype=dtype, devices=devices, param_dtype=param_dtype,
               shard_params=shard_params, **kw)

  @property
  def param_bytes(self) -> int:
    """Bytes of parameters that one device holds."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(self.state))

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def batch_rows(self, batch_size: int | None, rows: int) -> int:
    """Rows per device call: min(batch_size, rows) rounded up to a multiple of the devices."""
    b = max(1, min(batch_size or DEFAULT_BATCH_SIZE, rows))
    return -(-b // self.num_devices) * self.num_devices

  def prepare(self, object_image: ImageLike, background: ImageLike, **kw: Any) -> Prepared:
    """`prepare` at this model's E, G and context."""
    return prepare(object_image, background, encoder_size=self.encoder_size,
                   generator_size=self.generator_size, context=self.context, **kw)

  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, C) of one row's initial noise (`latents=`), NHWC."""
    side = self.generator_size // self.latent_factor
    return side, side, self.latent_channels

  def submit(self, rows: Sequence[tuple[Prepared, int]], *, batch: int, steps: int,
             guidance: float, sampler: str, latents: np.ndarray | None = None) -> Pending:
    """Dispatches one device batch of (job, sample index) rows, padded to `batch` rows
    (a multiple of the device count); returns at once (JAX dispatch is asynchronous).
    `latents`: optional initial noise, (len(rows), h, w, C) float32, instead of the seeds'."""
    if not rows or len(rows) > batch or batch % self.num_devices:
      raise ValueError(f"{len(rows)} rows for a batch of {batch} on {self.num_devices} devices")
    padded = list(rows) + [rows[-1]] * (batch - len(rows))
    fn = _runner(self.graphdef, self.mesh, int(steps), sampler, self.prediction_type,
                 guidance != 1, latents is not None, self.state_shardings)
    if latents is not None:
      latents = np.concatenate([latents, np.repeat(latents[-1:], batch - len(rows), 0)])
    # Placed here, not by jit: with several processes jit takes no numpy array to split.
    rows_on = NamedSharding(self.mesh, P(sharding.BATCH_AXES))
    repl = NamedSharding(self.mesh, P())
    put = lambda a: jax.device_put(a, rows_on)  # noqa: E731
    out = fn(self.state,
             put(np.stack([p.object_in for p, _ in padded])),
             put(np.stack([p.target_in for p, _ in padded])),
             put(np.stack([p.mask_in for p, _ in padded])),
             put(np.array([p.seed for p, _ in padded], np.uint32)),
             put(np.array([k for _, k in padded], np.uint32)),
             jax.device_put(np.float32(guidance), repl),
             jax.device_put(np.zeros((), np.float32), repl) if latents is None
             else put(latents))
    return Pending(out, len(rows))

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


# ---------------------------------------------------------------------------------------------
# Parameters at scale: their dtype and placement.

PARAM_DTYPES = ("float32", "bfloat16")
SHARD_MODES = ("auto", "always", "never")
# shard_params='auto' splits the parameters when they would take more than this share of one
# device's memory (the rest is left for the activations of the sampler, guidance doubling them).
AUTO_SHARD_FRACTION = 0.5


def check_param_dtype(param_dtype: str | None) -> str | None:
  if param_dtype is not None and param_dtype not in PARAM_DTYPES:
    raise UserError(f"param dtype {param_dtype!r}: expected one of {', '.join(PARAM_DTYPES)}")
  return param_dtype


def _cast_dtype(x: Any, param_dtype: str | None):
  """The dtype a parameter is stored in: `param_dtype` for floating ones, else its own."""
  if param_dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.dtype(param_dtype)
  return jnp.dtype(x.dtype)


def state_bytes(state: Any, param_dtype: str | None = None) -> int:
  """Bytes of a (possibly abstract) parameter tree once cast to `param_dtype`."""
  return sum(math.prod(x.shape) * _cast_dtype(x, param_dtype).itemsize
             for x in jax.tree.leaves(state))


def device_memory(device: jax.Device) -> int | None:
  """Bytes of memory a device offers to JAX (None where unknown, e.g. on CPU)."""
  try:
    stats = device.memory_stats()
  except Exception:  # backends without memory statistics
    return None
  return (stats or {}).get("bytes_limit")


def shard_decision(mode: str, nbytes: int, devices: Sequence[jax.Device]) -> bool:
  """Whether parameters of `nbytes` are split over `devices` under `shard_params=mode`."""
  if mode not in SHARD_MODES:
    raise UserError(f"shard params {mode!r}: expected one of {', '.join(SHARD_MODES)}")
  if mode == "never" or len(devices) < 2:
    return False
  if mode == "always":
    return True
  limit = device_memory(devices[0])
  return limit is not None and nbytes > AUTO_SHARD_FRACTION * limit


def inference_mesh(devices: Sequence[jax.Device], sharded: bool) -> Mesh:
  """The mesh (data, fsdp, tensor) of `devices`: all on 'data' when every device holds all
  parameters, all on 'fsdp' when they are split. Batch rows are split over data x fsdp, i.e.
  over every device, either way."""
  grid = np.array(list(devices), dtype=object)
  shape = (1, grid.size, 1) if sharded else (grid.size, 1, 1)
  return Mesh(grid.reshape(shape), sharding.MESH_AXES)


def inference_rules() -> tuple[tuple[str, str | None], ...]:
  """The training configs' logical-axis rules with every split put on 'fsdp', the one mesh
  axis of sharded inference: each weight is split along its first logical axis that training
  splits at all (embed, heads, mlp, conv_in or conv_out) and that the device count divides,
  and gathered where it is used; norms, biases and the cross-attention inputs stay whole."""
  from imprint_jax.configs.common import LOGICAL_AXIS_RULES
  return tuple((name, "fsdp" if axes else None) for name, axes in LOGICAL_AXIS_RULES)


_SHARDINGS: dict[tuple, Any] = {}


def _abstract_params(cfg: ImprintConfig) -> nnx.State:
  return nnx.state(nnx.eval_shape(lambda: Imprint(cfg, rngs=layers.init_rngs(0))), nnx.Param)


def param_shardings(cfg: ImprintConfig, mesh: Mesh) -> Any:
  """NamedShardings (a pure dict, like `Compositor.state`) of the split parameters."""
  key = (cfg, mesh)
  if key not in _SHARDINGS:
    tree = sharding.tree_shardings(_abstract_params(cfg), mesh, inference_rules())
    _SHARDINGS[key] = nnx.to_pure_dict(tree)
  return _SHARDINGS[key]


def place_params(params: Any, mesh: Mesh, shardings: Any | None,
                 param_dtype: str | None) -> Any:
  """A pure dict of parameters cast to `param_dtype` (one array at a time, where it lies) and
  placed by `shardings` (None: a full copy on every device of `mesh`)."""
  repl = NamedSharding(mesh, P())
  if shardings is None:
    shardings = jax.tree.map(lambda _: repl, params)

  def one(x, s):
    dtype = _cast_dtype(x, param_dtype)
    if x.dtype != dtype:
      x = x.astype(dtype)
    return jax.device_put(x, s)

  return jax.tree.map(one, params, shardings)


def load_placed(path: str | os.PathLike, *, dtype: str, devices: Sequence[jax.Device] | None,
                param_dtype: str | None, shard_params: str) -> tuple[Imprint, dict[str, Any]]:
  """A stage-2 checkpoint's model with its parameters restored as `param_dtype` directly
  into the placement `Compositor` gives them (so a model that does not fit one device never
  lands on one), and its metadata."""
  ckpt = ckpt_lib.resolve(path)
  meta = ckpt_lib.read_meta(ckpt)
  cfg = ImprintConfig.from_dict(meta["model"])
  if cfg.stage != 2:
    raise UserError(f"{ckpt}: a stage-{cfg.stage} checkpoint (UNet with"
                    f" {cfg.unet.in_channels} input channels); this needs stage 2")
  cfg = cfg.with_dtype(dtype, remat="none")
  param_dtype = check_param_dtype(param_dtype)
  devices = list(devices or jax.local_devices())
  abstract = nnx.eval_shape(lambda: Imprint(cfg, rngs=layers.init_rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  sharded = shard_decision(shard_params, state_bytes(params, param_dtype), devices)
  mesh = inference_mesh(devices, sharded)
  rules = inference_rules() if sharded else [(name, None) for name, _ in inference_rules()]
  shardings = sharding.tree_shardings(params, mesh, rules)
  # The restore target's dtype is what orbax reads the stored float32 arrays as.
  nnx.update(abstract, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, _cast_dtype(x, param_dtype)), params))
  state = ckpt_lib.restore_model_state(ckpt, abstract, shardings)
  graphdef, _ = nnx.split(abstract, nnx.Param)
  return nnx.merge(graphdef, state), meta


def sampler_memory(cfg: ImprintConfig, batch: int, *, param_dtype: str | None = None,
                   dtype: str = "bfloat16", shard_params: str = "never",
                   devices: Sequence[jax.Device] | None = None,
                   encoder_size: int = DEFAULT_ENCODER_SIZE,
                   generator_size: int = DEFAULT_GENERATOR_SIZE, steps: int = 50,
                   guidance: float = 5.0, sampler: str = "ddim") -> dict[str, Any]:
  """Per-device memory of the Compositor's compiled batch function (sampler + VAE decode) for
  `batch` rows of `cfg`, compiled from abstract inputs: nothing is allocated, so the real
  model can be planned on any host (like `imprint-jax plan` for training).

  Returns bytes per device: 'params' (the parameters, exact from their shardings),
  'arguments' (params + the batch's inputs), 'outputs', 'temporaries' (XLA's buffers for the
  activations) and 'peak' = arguments + outputs + temporaries - aliased; plus 'devices',
  'rows' (the batch rounded up to the devices) and 'sharded'. The figures are those of the
  compiler for `devices` (on CPU: the CPU compiler's schedule and the model's CPU forms).
  """
  cfg = cfg.with_dtype(dtype, remat="none")
  devices = list(devices or jax.local_devices())
  param_dtype = check_param_dtype(param_dtype)
  params = nnx.to_pure_dict(_abstract_params(cfg))
  sharded = shard_decision(shard_params, state_bytes(params, param_dtype), devices)
  mesh = inference_mesh(devices, sharded)
  shardings = param_shardings(cfg, mesh) if sharded else None
  place = shardings or jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
      x.shape, _cast_dtype(x, param_dtype), sharding=s), params, place)
  n = len(devices)
  b = -(-max(1, batch) // n) * n
  rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
  E, G = encoder_size, generator_size

  def arg(shape, dt=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dt, sharding=rows)

  fn = _runner(_graphdef_for(cfg), mesh, steps, sampler, "epsilon", guidance != 1,
               state_shardings=shardings)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled = fn.lower(abstract, arg((b, E, E, 3)), arg((b, G, G, 3)), arg((b, G, G, 1)),
                      arg((b,), jnp.uint32), arg((b,), jnp.uint32), scalar, scalar).compile()
  m = compiled.memory_analysis()
  param_bytes = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(place)))
  out = {"devices": n, "rows": b, "sharded": sharded, "params": param_bytes,
         "arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes}
  out["peak"] = (out["arguments"] + out["outputs"] + out["temporaries"]
                 - m.alias_size_in_bytes)
  return out


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


def settings_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
  """encoder_size, generator_size, context and prediction_type recorded in a checkpoint's
  metadata (training writes its run config under 'config'); defaults where absent."""
  config = meta.get("config") or {}
  data = config.get("data") or {}
  train = config.get("train") or {}
  return {"encoder_size": int(data.get("encoder_size", DEFAULT_ENCODER_SIZE)),
          "generator_size": int(data.get("generator_size", DEFAULT_GENERATOR_SIZE)),
          "context": float(data.get("context", DEFAULT_CONTEXT)),
          "prediction_type": str(train.get("prediction_type", "epsilon"))}


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
  placement = {"param_dtype": param_dtype, "shard_params": shard_params or "auto"}
  if isinstance(model, Compositor):
    comp = model
    if any(v is not None for v in (*overrides.values(), param_dtype, shard_params)):
      raise UserError("give encoder_size/generator_size/context/prediction_type/param_dtype/"
                      "shard_params to the Compositor, not to composite()")
  elif isinstance(model, Imprint):
    comp = Compositor(model, **placement,
                      **{k: v for k, v in overrides.items() if v is not None})
  elif isinstance(model, (str, os.PathLike)):
    comp = Compositor.from_checkpoint(model, **placement, **overrides)
  else:
    raise UserError(f"model: expected an Imprint, a Compositor or a checkpoint path, got"
                    f" {type(model).__name__}")
  job = comp.prepare(object_image, background, object_mask=object_mask, mask=mask, box=box,
                     mask_level=mask_level, seed=seed, num_samples=num_samples,
                     feather=feather)
  batch = batch_size or min(num_samples, DEFAULT_BATCH_SIZE)
  return comp.run([job], steps=steps, guidance=guidance, sampler=sampler, batch_size=batch,
                  latents=latents)[0]


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
