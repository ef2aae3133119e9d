"""IMPRINT object compositing as a diffusers pipeline: PyTorch, numpy and PIL only.

`imprint-jax export` ships this file verbatim into the exported folder (with
`adapter/torch_adapter.py`; one file, longer than the package's others, because diffusers loads
a custom pipeline from a single module), so that a PyTorch user without JAX or imprint-jax runs

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("export/", trust_remote_code=True)
    out = pipe(object_image=obj, background_image=bg, mask_image=mask,   # or box=(x0, y0, x1, y1)
               mask_level=1, num_inference_steps=50, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0))               # latents=... optional
    out.images[0]   # PIL image at the background's full size

It does what `imprint_jax.compositing` does (see that module's docstring for the full recipe),
step for step:

  1. Object: segmented by `object_mask`, else by its alpha (>= 128), else the whole image;
     centred on a white square around its box, resized to E x E (Lanczos), ImageNet-normalised.
  2. Region: the mask (level 1), that mask coarsened to level 2..4 (the recipe of
     `imprint_jax.data.masks`, drawn from numpy's default_rng(mask_seed)), or a box (level 4).
  3. Target window: the square of side context x the region box's longer side, shifted into
     the frame; the background crop resized to G x G (Lanczos), the region bilinearly and
     thresholded at half.
  4. Latents: the background crop's VAE latent (distribution mean x scaling factor) with the
     region blanked (condition), the full crop's latent (kept by blending), the region
     max-pooled to the latent grid. UNet input channels: [latents, masked-background latent,
     mask]. Classifier-free guidance against the adapter's learned null context:
     cond + (s - 1) (cond - uncond). After every scheduler step the latent outside the region is
     replaced by the background latent noised to the step's level with the initial noise.
  5. Paste: the decoded G x G crop resized back to the window (Lanczos) and blended with
     alpha = clip(1 - d / feather, 0, 1), d = Euclidean distance to the region; beyond the
     seam every pixel is the background's, exactly.

Every setting comes from the folder: E, G, context, defaults and the channel order from
`model_index.json`, the sampler and prediction type from `scheduler/`, the VAE scaling from
`vae/config.json`. `latents=` (NCHW, B x 4 x G/8 x G/8) replaces the generator's noise; the JAX
compositor given the same noise in NHWC (`latents=`) makes the same composite.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

ImageLike = Union[str, os.PathLike, PIL.Image.Image, np.ndarray]

OBJECT_FILL = 255
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
UNET_INPUT_ORDER = "noisy_latent,masked_background_latent,mask"


# ---------------------------------------------------------------------------------------------
# Reading images and masks (as imprint_jax.compositing.load_image / load_mask).


def _open(src: ImageLike, role: str) -> PIL.Image.Image | np.ndarray:
  if isinstance(src, np.ndarray):
    return src
  if isinstance(src, (str, os.PathLike)):
    if not os.path.isfile(src):
      raise ValueError(f"{role} {src}: no such file")
    img = Image.open(src)
    img.load()
  elif isinstance(src, PIL.Image.Image):
    img = src
  else:
    raise ValueError(f"{role}: expected a path, a PIL image or a numpy array, got"
                     f" {type(src).__name__}")
  try:
    return ImageOps.exif_transpose(img)
  except (OSError, ValueError, SyntaxError):
    return img


def _to_uint8(values: np.ndarray) -> np.ndarray:
  v = np.asarray(values)
  if v.dtype == np.uint8:
    return v
  if v.dtype == bool:
    return v.astype(np.uint8) * 255
  if np.issubdtype(v.dtype, np.floating):
    v = np.nan_to_num(v.astype(np.float64))
    if v.size and v.max() > 1.0:
      return np.clip(np.rint(v), 0, 255).astype(np.uint8)
    return np.clip(np.rint(v * 255.0), 0, 255).astype(np.uint8)
  v = v.astype(np.int64)
  if (values.dtype.kind == "u" and values.dtype.itemsize == 2) or (v.size and v.max() > 255):
    return ((np.clip(v, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
  return np.clip(v, 0, 255).astype(np.uint8)


def _pixels(img: PIL.Image.Image | np.ndarray, role: str) -> tuple[np.ndarray, np.ndarray | None]:
  """-> (RGB (H, W, 3) uint8, alpha (H, W) uint8 or None)."""
  if isinstance(img, np.ndarray):
    a = img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img
    if a.ndim == 2:
      g = _to_uint8(a)
      return np.repeat(g[..., None], 3, axis=2), None
    if a.ndim != 3 or a.shape[2] not in (2, 3, 4) or 0 in a.shape[:2]:
      raise ValueError(f"{role}: array of shape {a.shape}; expected (H, W), (H, W, 3) or"
                       " (H, W, 4)")
    a = _to_uint8(a)
    if a.shape[2] == 2:
      return np.repeat(a[..., :1], 3, axis=2), a[..., 1]
    if a.shape[2] == 4:
      return np.ascontiguousarray(a[..., :3]), a[..., 3]
    return a, None
  mode = img.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    return _pixels(np.asarray(img), role)
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      mode in ("P", "L", "RGB") and "transparency" in img.info):
    rgba = np.asarray(img.convert("RGBA"))
    return np.ascontiguousarray(rgba[..., :3]), rgba[..., 3]
  return np.asarray(img if mode == "RGB" else img.convert("RGB")), None


def _flatten_on_white(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
  if alpha is None:
    return rgb
  a = alpha[..., None].astype(np.float32) / 255.0
  return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _load_mask(src: ImageLike, role: str) -> np.ndarray:
  """(H, W) bool: brightest channel (times alpha) >= 128, or non-zero in a 0/1 mask."""
  img = _open(src, role)
  if isinstance(img, PIL.Image.Image) and img.mode in ("1", "L", "I;16", "I;16L", "I;16B",
                                                       "I;16N", "I", "F"):
    level = np.asarray(img)
  elif isinstance(img, np.ndarray) and (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1)):
    level = img.reshape(img.shape[:2])
  else:
    rgb, alpha = _pixels(img, role)
    level = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    if alpha is not None:
      level = ((level.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
  if level.dtype == bool:
    return level
  if level.size and np.issubdtype(level.dtype, np.integer) and level.max() <= 1:
    return level > 0
  return _to_uint8(level) >= 128


# ---------------------------------------------------------------------------------------------
# Crops (as imprint_jax.data.crops, which made the training pairs).


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
  rows = np.flatnonzero(mask.any(axis=1))
  if rows.size == 0:
    return None
  cols = np.flatnonzero(mask.any(axis=0))
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
  """(S, S) bool -> (size, size) bool (bilinear, threshold at half)."""
  m = Image.fromarray(mask.astype(np.uint8) * 255)
  if m.size != (size, size):
    m = m.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(m) >= 128


def _cut_square(image: np.ndarray, x0: int, y0: int, side: int, fill: Any) -> np.ndarray:
  h, w = image.shape[:2]
  out = np.full((side, side) + image.shape[2:], fill, image.dtype)
  sx0, sy0 = max(x0, 0), max(y0, 0)
  sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
  if sx1 > sx0 and sy1 > sy0:
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
  return out


def _object_crop(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
  x0, y0, x1, y1 = _bbox(mask)
  side = max(x1 - x0, y1 - y0)
  sx0, sy0 = x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2
  cut_mask = _cut_square(mask, sx0, sy0, side, False)
  cut = _cut_square(image, sx0, sy0, side, OBJECT_FILL)
  cut = np.where(cut_mask[..., None], cut, np.uint8(OBJECT_FILL)).astype(np.uint8)
  return _resize_image(cut, size)


def _target_window(box: tuple[int, int, int, int], width: int, height: int,
                   context: float) -> tuple[int, int, int]:
  x0, y0, x1, y1 = box
  longest = max(x1 - x0, y1 - y0)
  side = max(longest, min(int(round(context * longest)), min(width, height)))

  def place(lo: int, hi: int, extent: int) -> int:
    start = int(np.floor((lo + hi) / 2 - side / 2))
    if side <= extent:
      start = min(max(start, 0), extent - side)
    return start

  return place(x0, x1, width), place(y0, y1, height), side


# ---------------------------------------------------------------------------------------------
# Mask levels 2-4 (the recipe of imprint_jax.data.masks, without scipy).


def _gaussian_blur(x: np.ndarray, sigma: float, truncate: float = 3.0) -> np.ndarray:
  """Separable Gaussian (std `sigma` px, zero outside, radius int(truncate sigma + 0.5))."""
  radius = int(truncate * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1)
  weights = np.exp(-0.5 / sigma ** 2 * offsets.astype(np.float64) ** 2)
  weights /= weights.sum()
  out = x.astype(np.float64)
  for axis in (0, 1):
    padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
    n = out.shape[axis]
    acc = np.zeros_like(out)
    for w, off in zip(weights, offsets):
      acc += w * np.take(padded, np.arange(n) + off + radius, axis=axis)
    out = acc
  return out.astype(np.float32)


def _blur(crop: np.ndarray, sigma: float) -> np.ndarray:
  k = max(1, int(sigma // 3))
  pad = int(np.ceil(3 * sigma / k)) * k
  x = np.pad(crop.astype(np.float32), ((pad, pad + (-crop.shape[0]) % k),
                                       (pad, pad + (-crop.shape[1]) % k)))
  hp, wp = x.shape
  small = x.reshape(hp // k, k, wp // k, k).mean(axis=(1, 3))
  soft = _gaussian_blur(small, sigma / k)
  if k > 1:
    soft = np.asarray(Image.fromarray(soft, mode="F").resize((wp, hp), Image.Resampling.BILINEAR))
  return soft[pad:pad + crop.shape[0], pad:pad + crop.shape[1]]


def _convex_hull(points: np.ndarray) -> np.ndarray | None:
  """Vertices of the convex hull of (N, 2) points, counter-clockwise (monotone chain)."""
  pts = sorted(set(map(tuple, points.tolist())))
  if len(pts) < 3:
    return None

  def cross(o, a, b):
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

  lower, upper = [], []
  for p in pts:
    while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
      lower.pop()
    lower.append(p)
  for p in reversed(pts):
    while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
      upper.pop()
    upper.append(p)
  hull = lower[:-1] + upper[:-1]
  return np.asarray(hull) if len(hull) >= 3 else None


def _hull(crop: np.ndarray) -> np.ndarray:
  h, w = crop.shape
  rows = np.flatnonzero(crop.any(axis=1))
  first = crop[rows].argmax(axis=1)
  last = w - 1 - crop[rows, ::-1].argmax(axis=1)
  xs = np.concatenate([first, last]).astype(np.float64)
  ys = np.concatenate([rows, rows]).astype(np.float64)
  pts = np.concatenate([np.stack([xs + dx, ys + dy], axis=1)
                        for dx in (-0.5, 0.5) for dy in (-0.5, 0.5)])
  poly = _convex_hull(pts)
  if poly is None:
    return np.ones_like(crop)
  img = Image.new("1", (w, h), 0)
  ImageDraw.Draw(img).polygon([tuple(p) for p in poly], fill=1, outline=1)
  return np.asarray(img, dtype=bool)


def _superellipse(shape: tuple[int, int], power: float) -> np.ndarray:
  h, w = shape
  y = (np.arange(h) + 0.5 - h / 2) / (h / 2)
  x = (np.arange(w) + 0.5 - w / 2) / (w / 2)
  return (np.abs(x)[None, :] ** power + np.abs(y)[:, None] ** power) <= 1.0


def coarse_mask(mask: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
  """The (H, W) bool mask at shape-guidance `level` (1 precise, 2 smooth, 3 bulging box, 4 box)."""
  m = np.asarray(mask) > 0
  x0, y0, x1, y1 = _bbox(m)
  draws = {"sigma_frac": rng.uniform(0.02, 0.06), "threshold": rng.uniform(0.05, 0.2),
           "power": rng.uniform(2.5, 6.0)}
  crop = m[y0:y1, x0:x1]
  if level >= 2:
    if level == 4:
      crop = np.ones_like(crop)
    else:
      sigma = max(1.0, draws["sigma_frac"] * max(y1 - y0, x1 - x0))
      crop2 = crop | (_blur(crop, sigma) > draws["threshold"])
      crop = crop2 if level == 2 else (
          crop2 | _hull(crop2) | _superellipse(crop.shape, draws["power"]))
  out = np.zeros_like(m)
  out[y0:y1, x0:x1] = crop
  return out


# ---------------------------------------------------------------------------------------------
# Pasting back (as imprint_jax.compositing.paste).


def _distance_within(inside: np.ndarray, reach: int) -> np.ndarray:
  """Euclidean distance (px) of every pixel to the nearest `inside` pixel, exact up to `reach`
  (larger distances come out > reach). Float64 (H, W)."""
  h, w = inside.shape
  big = reach + 1
  # Column pass: vertical distance to the nearest inside pixel in the same column.
  idx = np.arange(h)[:, None].repeat(w, axis=1)
  last = np.maximum.accumulate(np.where(inside, idx, -10 * (big + h)), axis=0)
  nxt = np.flip(np.minimum.accumulate(np.flip(np.where(inside, idx, 10 * (big + h)), 0), 0), 0)
  g = np.minimum(np.minimum(idx - last, nxt - idx), big).astype(np.int64)
  # Row pass: only horizontal offsets within `reach` can give a distance <= reach.
  d2 = g ** 2
  padded = np.pad(g, ((0, 0), (reach, reach)), constant_values=big)
  for dx in range(-reach, reach + 1):
    if dx:
      d2 = np.minimum(d2, padded[:, reach + dx:reach + dx + w] ** 2 + dx * dx)
  return np.sqrt(d2.astype(np.float64))


def paste(background: np.ndarray, crop: np.ndarray, window: tuple[int, int, int],
          region: np.ndarray, feather: float) -> np.ndarray:
  """The G x G crop blended into the (H, W, 3) uint8 background; background beyond the seam."""
  height, width = background.shape[:2]
  x0, y0, side = window
  out = background.copy()
  bx0, by0, bx1, by1 = _bbox(region)
  grow = int(math.ceil(feather))
  sx0, sy0 = max(bx0 - grow, x0, 0), max(by0 - grow, y0, 0)
  sx1, sy1 = min(bx1 + grow, x0 + side, width), min(by1 + grow, y0 + side, height)
  if sx1 <= sx0 or sy1 <= sy0:
    return out
  inside = region[sy0:sy1, sx0:sx1]
  if feather > 0:
    alpha = np.clip(1.0 - _distance_within(inside, grow) / feather, 0.0, 1.0)
  else:
    alpha = inside.astype(np.float64)
  scale = crop.shape[0] / side
  src_box = ((sx0 - x0) * scale, (sy0 - y0) * scale, (sx1 - x0) * scale, (sy1 - y0) * scale)
  gen = np.asarray(Image.fromarray(crop).resize((sx1 - sx0, sy1 - sy0),
                                                Image.Resampling.LANCZOS, box=src_box))
  bg = out[sy0:sy1, sx0:sx1]
  a = alpha[..., None]
  mixed = np.rint(bg * (1.0 - a) + gen * a).astype(np.uint8)
  out[sy0:sy1, sx0:sx1] = np.where(a > 0, mixed, bg)
  return out


# ---------------------------------------------------------------------------------------------
# One job on the host.


def _as_list(value: Any, n: int, name: str) -> list:
  if isinstance(value, list):
    if len(value) != n:
      raise ValueError(f"{name}: {len(value)} items for a batch of {n}")
    return value
  return [value] * n


def _is_box(value: Any) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) == 4
          and all(isinstance(v, (int, float, np.integer, np.floating)) for v in value))


class _Job:
  """Crops at model size and what the paste needs (see the module docstring)."""

  def __init__(self, object_image, background_image, *, mask_image, box, object_mask,
               mask_level, mask_seed, feather, encoder_size, generator_size, context):
    if (mask_image is None) == (box is None):
      raise ValueError("give exactly one of mask_image (the region to fill) or box=(x0, y0,"
                       " x1, y1)")
    if mask_level is not None and mask_level not in (1, 2, 3, 4):
      raise ValueError(f"mask_level {mask_level!r}: expected one of 1, 2, 3, 4")
    bg_rgb, bg_alpha = _pixels(_open(background_image, "background_image"), "background_image")
    self.background = _flatten_on_white(bg_rgb, bg_alpha)
    height, width = self.background.shape[:2]
    if mask_image is not None:
      user = _load_mask(mask_image, "mask_image")
      if user.shape != (height, width):
        raise ValueError(f"mask_image: size {user.shape[1]}x{user.shape[0]} differs from the"
                         f" background's {width}x{height}")
      if not user.any():
        raise ValueError("mask_image is empty: mark the region to fill in white")
      level = 1 if mask_level is None else int(mask_level)
      region = user if level == 1 else coarse_mask(user, level, np.random.default_rng(mask_seed))
    else:
      if mask_level not in (None, 4):
        raise ValueError(f"mask_level {mask_level} needs a mask: a box is level 4")
      x0, y0, x1, y1 = (int(round(float(v))) for v in box)
      if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box ({x0},{y0},{x1},{y1}): need 0 <= x0 < x1 <= {width} and"
                         f" 0 <= y0 < y1 <= {height}")
      region = np.zeros((height, width), bool)
      region[y0:y1, x0:x1] = True
    self.region = region

    obj_rgb, obj_alpha = _pixels(_open(object_image, "object_image"), "object_image")
    if object_mask is not None:
      obj_mask = _load_mask(object_mask, "object_mask")
      if obj_mask.shape != obj_rgb.shape[:2] or not obj_mask.any():
        raise ValueError("object_mask: must match the object image's size and mark the object")
    elif obj_alpha is not None:
      obj_mask = obj_alpha >= 128
      if not obj_mask.any():
        raise ValueError("object_image: its alpha channel is fully transparent; give"
                         " object_mask")
    else:
      obj_mask = np.ones(obj_rgb.shape[:2], bool)
    crop = _object_crop(_flatten_on_white(obj_rgb, obj_alpha), obj_mask, encoder_size)
    self.object_in = crop.astype(np.float32)
    self.object_in *= (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
    self.object_in -= (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)

    self.window = _target_window(_bbox(region), width, height, context)
    cx0, cy0, side = self.window
    target = _resize_image(_cut_square(self.background, cx0, cy0, side, 0), generator_size)
    self.mask_in = _resize_mask(_cut_square(region, cx0, cy0, side, False), generator_size)
    if not self.mask_in.any():
      raise ValueError(f"the region is too thin: nothing of it is left at the model's"
                       f" {generator_size}x{generator_size} crop; draw a larger region")
    self.target_in = target.astype(np.float32)
    self.target_in *= np.float32(1 / 127.5)
    self.target_in -= np.float32(1.0)
    self.feather = (max(3.0, float(round(0.02 * side))) if feather is None else float(feather))


# ---------------------------------------------------------------------------------------------
# The pipeline.


class ImprintCompositingPipeline(DiffusionPipeline):
  """Composites an object into a background with an IMPRINT stage-2 model.

  Components: `image_encoder` (transformers DINOv2), `adapter` (the content adapter,
  `adapter/torch_adapter.py`), `unet` (9 input channels), `vae`, `scheduler`.
  """

  model_cpu_offload_seq = "image_encoder->adapter->unet->vae"

  def __init__(self, vae, unet, scheduler, image_encoder, adapter, encoder_size: int = 224,
               generator_size: int = 512, context: float = 2.0,
               default_num_inference_steps: int = 50, default_guidance_scale: float = 5.0,
               unet_input_order: str = UNET_INPUT_ORDER):
    super().__init__()
    if unet_input_order != UNET_INPUT_ORDER:
      raise ValueError(f"unet_input_order {unet_input_order!r}: this pipeline builds"
                       f" {UNET_INPUT_ORDER!r}")
    self.register_modules(vae=vae, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                          adapter=adapter)
    self.register_to_config(encoder_size=encoder_size, generator_size=generator_size,
                            context=context,
                            default_num_inference_steps=default_num_inference_steps,
                            default_guidance_scale=default_guidance_scale,
                            unet_input_order=unet_input_order)

  @property
  def latent_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  def _vae_latent(self, x_BCHW: torch.Tensor) -> torch.Tensor:
    mean = self.vae.encode(x_BCHW.to(self.vae.dtype)).latent_dist.mean
    return mean.float() * self.vae.config.scaling_factor

  def _noise_level_after(self, i: int, timesteps: torch.Tensor) -> float:
    """abar of the latent after step i: the next step's timestep, or, after the last step,
    the scheduler's final level (DDIM with set_alpha_to_one=false: abar_0; else clean)."""
    if i + 1 < len(timesteps):
      return float(self.scheduler.alphas_cumprod[int(timesteps[i + 1])])
    final = getattr(self.scheduler, "final_alpha_cumprod", None)
    return 1.0 if final is None else float(final)

  @torch.no_grad()
  def __call__(self, object_image: ImageLike | list[ImageLike],
               background_image: ImageLike | list[ImageLike], *,
               mask_image: ImageLike | list[ImageLike] | None = None,
               box: Sequence[float] | list[Sequence[float]] | None = None,
               object_mask: ImageLike | list[ImageLike] | None = None,
               mask_level: int | None = None, num_inference_steps: int | None = None,
               guidance_scale: float | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None,
               latents: torch.Tensor | None = None, feather: float | None = None,
               mask_seed: int = 0, output_type: str = "pil", return_dict: bool = True):
    """Args:
      object_image: the object (PIL image, array or path), or a list (a batch).
      background_image: the background(s); the output has each background's size.
      mask_image: the region to fill, same size as the background (level 1 unless
        `mask_level`), or a list.
      box: (x0, y0, x1, y1) in background pixels, x1/y1 exclusive (level 4), or a list.
      object_mask: segments the object (default: its alpha channel, else the whole image).
      mask_level: 1..4; levels 2-4 coarsen `mask_image` (seeded by `mask_seed`).
      num_inference_steps, guidance_scale: default from model_index.json.
      generator: torch generator(s) for the initial noise; or give `latents`
        (B, 4, G/8, G/8) float32 NCHW.
      feather: seam width in background pixels (default max(3, round(0.02 x window side))).
      output_type: "pil" (list of PIL images) or "np" (list of (H, W, 3) uint8 arrays).
    """
    cfg = self.config
    channels = self.vae.config.latent_channels
    if self.unet.config.in_channels != 2 * channels + 1:
      raise ValueError(f"this UNet takes {self.unet.config.in_channels} input channels;"
                       f" compositing needs {2 * channels + 1} (a stage-2 IMPRINT model)")
    steps = int(cfg.default_num_inference_steps if num_inference_steps is None
                else num_inference_steps)
    scale = float(cfg.default_guidance_scale if guidance_scale is None else guidance_scale)
    batch = max(len(v) if isinstance(v, list) else 1
                for v in (object_image, background_image, mask_image, object_mask))
    if isinstance(box, list) and not _is_box(box):
      batch = max(batch, len(box))
      boxes = _as_list(box, batch, "box")
    else:
      boxes = [box] * batch
    jobs = [_Job(o, b, mask_image=m, box=bx, object_mask=om, mask_level=mask_level,
                 mask_seed=mask_seed, feather=feather, encoder_size=cfg.encoder_size,
                 generator_size=cfg.generator_size, context=cfg.context)
            for o, b, m, bx, om in zip(_as_list(object_image, batch, "object_image"),
                                       _as_list(background_image, batch, "background_image"),
                                       _as_list(mask_image, batch, "mask_image"), boxes,
                                       _as_list(object_mask, batch, "object_mask"))]
    device = self._execution_device
    nchw = lambda a: torch.from_numpy(np.stack(a)).to(device).permute(0, 3, 1, 2)

    # Object -> cross-attention context (and the learned null context for guidance).
    pixels = nchw([j.object_in for j in jobs]).to(self.image_encoder.dtype)
    tokens = self.image_encoder(pixel_values=pixels).last_hidden_state
    context = self.adapter(tokens.to(self.adapter.dtype))
    null = self.adapter.null(batch, context.shape[1]).to(context.dtype)

    # Background latents and the latent-resolution mask.
    target = nchw([j.target_in for j in jobs])
    mask = nchw([j.mask_in[..., None].astype(np.float32) for j in jobs])
    z_bg = self._vae_latent(target * (1.0 - mask))
    z_full = self._vae_latent(target)
    m_lat = F.max_pool2d(mask, self.latent_factor)

    shape = z_full.shape
    if latents is None:
      latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
      latents = latents * self.scheduler.init_noise_sigma
    else:
      if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents of shape {tuple(latents.shape)}: expected {tuple(shape)}"
                         " (NCHW)")
      latents = latents.to(device=device, dtype=torch.float32)
    x_T = latents

    self.scheduler.set_timesteps(steps, device=device)
    timesteps = self.scheduler.timesteps
    use_cfg = scale != 1.0
    cond_in = torch.cat([z_bg, m_lat], dim=1)
    ctx = torch.cat([context, null]) if use_cfg else context
    x = latents
    for i, t in enumerate(self.progress_bar(timesteps)):
      model_in = torch.cat([self.scheduler.scale_model_input(x, t), cond_in], dim=1)
      if use_cfg:
        model_in = torch.cat([model_in, model_in])
      out = self.unet(model_in.to(self.unet.dtype), t, encoder_hidden_states=ctx.to(
          self.unet.dtype)).sample.float()
      if use_cfg:
        cond, uncond = out.chunk(2)
        out = cond + (scale - 1.0) * (cond - uncond)
      x = self.scheduler.step(out, t, x).prev_sample.float()
      a = self._noise_level_after(i, timesteps)
      keep = math.sqrt(a) * z_full + math.sqrt(1.0 - a) * x_T
      x = m_lat * x + (1.0 - m_lat) * keep

    image = self.vae.decode((x / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
    image = torch.floor((image.float().clamp(-1.0, 1.0) + 1.0) * 127.5 + 0.5)
    crops = image.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    results = [paste(j.background, c, j.window, j.region, j.feather) for j, c in zip(jobs, crops)]
    self.maybe_free_model_hooks()
    if output_type == "pil":
      results = [Image.fromarray(r) for r in results]
    elif output_type != "np":
      raise ValueError(f"output_type {output_type!r}: expected 'pil' or 'np'")
    if not return_dict:
      return (results,)
    return ImagePipelineOutput(images=results)
