"""Object augmentation: geometry (affine, perspective, flip) and colour/light (jitter, 3-D LUTs).

This is the perturbation that turns a single image into a stage-2 training pair (IMPRINT
Sec. 3.3: "affine transformations and colour/light perturbation supported by a look-up table"):
the perturbed object is the encoder input, the untouched image is the target. It runs in grain
worker processes, on numpy/PIL only, and every random draw comes from the `np.random.Generator`
passed in (grain seeds it from the pipeline seed and the element's position), never from global
state.

Geometry is applied jointly to the object image and its mask and the result is re-segmented:
every pixel outside the warped mask is set to `schema.OBJECT_FILL`. The transform is centred on
the object, and shrunk (never cropped) if the object would leave the canvas, so the encoder
always sees the whole object. Colour ops touch the object only; the background stays the fill.

The LUT perturbation is a random smooth 3-D colour look-up table: the identity on a
`lut_size`^3 grid plus low-frequency offsets (Gaussian noise on a 4^3 grid, cubic-upsampled),
applied with trilinear interpolation - a non-linear, channel-coupled recolouring similar to the
photo-retouching LUTs of the harmonisation literature. With `lut_dir` the table is instead one
of the 3-D LUT files (`.cube`, e.g. the photo filters of SSH, which the paper uses) in that
folder, drawn uniformly, applied the same way (`read_cube`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from imprint_jax.data import schema
from imprint_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities and ranges of the object perturbation (all draws uniform unless noted).

  Geometry (joint on image and mask):
    affine_prob: probability of a random affine (rotation, scale, shear, translation).
    rotation_deg: rotation in [-r, r] degrees.
    scale: (min, max) isotropic scale, drawn log-uniformly.
    shear_deg: shear angle in [-s, s] degrees (x direction).
    translate: shift in [-t, t] fractions of the canvas side, per axis.
    perspective_prob: probability of a random perspective warp.
    perspective: corner displacement in [-p, p] fractions of the object size.
    hflip_prob: probability of a horizontal flip.
  Colour and light (object pixels only):
    colour_prob: probability of the colour jitter below (all five ops at once).
    brightness: multiplicative factor 1 + U(-b, b).
    contrast: factor 1 + U(-c, c) around the object's mean grey.
    saturation: factor 1 + U(-s, s) around the pixel's luma.
    hue: rotation of the chroma plane (YIQ) by U(-h, h) turns.
    gamma: (min, max) exponent, drawn log-uniformly.
    lut_prob: probability of a random smooth 3-D LUT.
    lut_strength: standard deviation of the LUT's offsets, in [0, 1] colour units.
    lut_size: LUT grid points per axis (17 or 33 are the usual sizes).
    lut_dir: a folder of 3-D LUT files (`*.cube`, searched recursively): when set, the LUT
      is one of them (uniformly) instead of a random synthetic one; lut_strength and lut_size
      then do not apply. "" = synthetic tables.
  """
  affine_prob: float = 0.8
  rotation_deg: float = 15.0
  scale: tuple[float, float] = (0.8, 1.2)
  shear_deg: float = 8.0
  translate: float = 0.05
  perspective_prob: float = 0.3
  perspective: float = 0.08
  hflip_prob: float = 0.5
  colour_prob: float = 0.8
  brightness: float = 0.2
  contrast: float = 0.2
  saturation: float = 0.2
  hue: float = 0.03
  gamma: tuple[float, float] = (0.8, 1.25)
  lut_prob: float = 0.5
  lut_strength: float = 0.06
  lut_size: int = 17
  lut_dir: str = ""

  def __post_init__(self):
    for name in ("affine_prob", "perspective_prob", "hflip_prob", "colour_prob", "lut_prob"):
      p = getattr(self, name)
      if not 0.0 <= p <= 1.0:
        raise UserError(f"AugmentConfig.{name}={p}: a probability must be in [0, 1]")
    for name in ("scale", "gamma"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise UserError(f"AugmentConfig.{name}={(lo, hi)}: expected 0 < min <= max")
    if self.lut_size < 2:
      raise UserError(f"AugmentConfig.lut_size={self.lut_size}: expected at least 2")
    if self.lut_dir:
      load_lut_dir(self.lut_dir)  # fails loudly now, not in a data worker

  def perturb(self) -> AugmentConfig:
    """This config with the affine and the colour jitter always on (stage-2 'image' pairs)."""
    return dataclasses.replace(self, affine_prob=1.0, colour_prob=1.0)


def augment_object(image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Random geometry then colour/light perturbation of a segmented object.

  Args:
    image: (E, E, 3) uint8, the object with its background filled with OBJECT_FILL.
    mask: (E, E, 1) uint8 in {0, 255}, the object's mask.
    cfg: the probabilities and ranges.
    rng: the only source of randomness.

  Returns:
    (image, mask) of the same shapes and dtype; background pixels are OBJECT_FILL.
  """
  image, mask = random_geometry(image, mask, cfg, rng)
  image = random_colour(image, mask, cfg, rng)
  return image, mask


# ---------------------------------------------------------------------------------------------
# Geometry.


def _affine_matrix(angle: float, scale: float, shear: float) -> np.ndarray:
  """3x3 linear part: rotation(angle) @ shear_x(shear) @ scale, angles in radians."""
  c, s = np.cos(angle), np.sin(angle)
  rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
  sh = np.array([[1, np.tan(shear), 0], [0, 1, 0], [0, 0, 1]])
  return rot @ sh @ np.diag([scale, scale, 1.0])


def _translation(tx: float, ty: float) -> np.ndarray:
  return np.array([[1.0, 0, tx], [0, 1, ty], [0, 0, 1]])


def homography_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 3x3 homography H with H @ [src, 1] ~ [dst, 1] for 4 point pairs, each (4, 2)."""
  a = []
  b = []
  for (x, y), (u, v) in zip(src, dst):
    a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
    a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    b.extend([u, v])
  h = np.linalg.solve(np.asarray(a, np.float64), np.asarray(b, np.float64))
  return np.append(h, 1.0).reshape(3, 3)


def _apply_h(h: np.ndarray, pts_N2: np.ndarray) -> np.ndarray:
  p = pts_N2 @ h[:, :2].T + h[:, 2]
  return p[:, :2] / p[:, 2:3]


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1) pixel box of the non-zero pixels of an (H, W[, 1]) mask, exclusive end."""
  m = mask.reshape(mask.shape[0], mask.shape[1]) > 0
  rows = np.flatnonzero(m.any(axis=1))
  cols = np.flatnonzero(m.any(axis=0))
  if rows.size == 0:
    raise UserError("empty object mask: the record has no object pixels; re-run prepare")
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def warp(image: np.ndarray, mask: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Warps image and mask by the forward homography `h` (pixel-corner coordinates).

  Bilinear for both; the mask is re-thresholded at one half and the image re-segmented (every
  pixel outside the warped mask becomes OBJECT_FILL). Output has the input's size.
  """
  size = (image.shape[1], image.shape[0])
  inv = np.linalg.inv(h)
  inv = inv / inv[2, 2]
  coeffs = tuple(inv.reshape(-1)[:8])
  fill = (schema.OBJECT_FILL,) * 3
  img = Image.fromarray(image).transform(size, Image.Transform.PERSPECTIVE, coeffs,
                                         resample=Image.Resampling.BILINEAR, fillcolor=fill)
  msk = Image.fromarray(mask[..., 0]).transform(size, Image.Transform.PERSPECTIVE, coeffs,
                                                resample=Image.Resampling.BILINEAR, fillcolor=0)
  m = np.asarray(msk) >= 128
  out = np.asarray(img).copy()
  out[~m] = schema.OBJECT_FILL
  return out, (m[..., None] * np.uint8(255)).astype(np.uint8)


def random_geometry(image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Random affine / perspective / horizontal flip, applied jointly to image and mask.

  Shapes as in `augment_object`. When nothing is drawn the inputs are returned unchanged.
  """
  do_affine = rng.random() < cfg.affine_prob
  do_persp = rng.random() < cfg.perspective_prob
  do_flip = rng.random() < cfg.hflip_prob
  # Draw every parameter whatever the coin flips say, so that one probability does not shift
  # the random stream of the others (easier to reason about when tuning).
  angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
  scale = float(np.exp(rng.uniform(np.log(cfg.scale[0]), np.log(cfg.scale[1]))))
  shear = np.deg2rad(rng.uniform(-cfg.shear_deg, cfg.shear_deg))
  shift = rng.uniform(-cfg.translate, cfg.translate, size=2)
  corners_jitter = rng.uniform(-cfg.perspective, cfg.perspective, size=(4, 2))

  if do_flip and not (do_affine or do_persp):
    return image[:, ::-1].copy(), mask[:, ::-1].copy()  # exact, no resampling
  if not (do_affine or do_persp):
    return image, mask

  h_img, w_img = image.shape[:2]
  x0, y0, x1, y1 = mask_box(mask)
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  # Everything is built around the object's centre, then moved back to the canvas centre.
  hmat = _translation(-cx, -cy)
  if do_flip:
    hmat = np.diag([-1.0, 1.0, 1.0]) @ hmat
  if do_affine:
    hmat = _affine_matrix(angle, scale, shear) @ hmat
  if do_persp:
    bw, bh = max(x1 - x0, 1), max(y1 - y0, 1)
    src = np.array([[-bw / 2, -bh / 2], [bw / 2, -bh / 2], [bw / 2, bh / 2], [-bw / 2, bh / 2]])
    dst = src + corners_jitter * np.array([bw, bh])
    hmat = homography_from_points(src, dst) @ hmat
  tx, ty = (shift * np.array([w_img, h_img])) if do_affine else (0.0, 0.0)
  hmat = _translation(w_img / 2 + tx, h_img / 2 + ty) @ hmat

  # Where the object lands: map its pixel corners (a subsample is enough for a box).
  ys, xs = np.nonzero(mask[..., 0])
  step = max(1, ys.size // 4096)
  pts = np.stack([xs[::step], ys[::step]], axis=1).astype(np.float64)
  pts = np.concatenate([pts, pts + [1, 0], pts + [0, 1], pts + [1, 1]])
  nb = _apply_h(hmat, pts)
  nx0, ny0 = nb.min(axis=0)
  nx1, ny1 = nb.max(axis=0)
  # Shrink about the canvas centre if the object would overflow, then shift it inside.
  fit = min(1.0, 0.98 * w_img / max(nx1 - nx0, 1e-6), 0.98 * h_img / max(ny1 - ny0, 1e-6))
  if fit < 1.0:
    hmat = (_translation(w_img / 2, h_img / 2) @ np.diag([fit, fit, 1.0])
            @ _translation(-w_img / 2, -h_img / 2) @ hmat)
    nx0, nx1 = (np.array([nx0, nx1]) - w_img / 2) * fit + w_img / 2
    ny0, ny1 = (np.array([ny0, ny1]) - h_img / 2) * fit + h_img / 2
  dx = max(0.0, -nx0) - max(0.0, nx1 - w_img)
  dy = max(0.0, -ny0) - max(0.0, ny1 - h_img)
  hmat = _translation(dx, dy) @ hmat

  out_img, out_mask = warp(image, mask, hmat)
  if not out_mask.any():  # degenerate draw (object collapsed below a pixel): keep the input
    return image, mask
  return out_img, out_mask


# ---------------------------------------------------------------------------------------------
# Colour and light.

_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.596, -0.274, -0.322],
                        [0.211, -0.523, 0.312]], np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ.astype(np.float64)).astype(np.float32)
_LUMA = _RGB_TO_YIQ[0]


@functools.lru_cache(maxsize=8)
def _spline_matrix(size: int, coarse: int) -> np.ndarray:
  """(size, coarse) matrix: cubic-spline interpolation of `coarse` knots at `size` points."""
  t = np.linspace(0.0, coarse - 1.0, size)
  return np.stack([ndimage.map_coordinates(np.eye(coarse)[k], t[None], order=3, mode="nearest")
                   for k in range(coarse)], axis=1)


def random_lut(rng: np.random.Generator, size: int = 17, strength: float = 0.06,
               coarse: int = 4) -> np.ndarray:
  """A random smooth 3-D colour LUT: identity plus low-frequency offsets.

  Args:
    rng: source of the offsets.
    size: grid points per axis.
    strength: standard deviation of the random field's knots, in [0, 1] colour units;
      0 gives the identity.
    coarse: knots per axis of the random field (its frequency content).

  Returns:
    (size, size, size, 3) float32 in [0, 1]: lut[r, g, b] is the output RGB for the input
    colour (r, g, b) / (size - 1).
  """
  grid = np.linspace(0.0, 1.0, size, dtype=np.float32)
  ident = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), axis=-1)
  knots = rng.normal(0.0, 1.0, size=(coarse, coarse, coarse, 3))
  if strength == 0:
    return ident
  # The tensor-product spline is separable: upsample one axis at a time.
  w = _spline_matrix(size, coarse)
  offsets = np.einsum("ai,bj,ck,ijkd->abcd", w, w, w, knots, optimize=True)
  return np.clip(ident + strength * offsets, 0.0, 1.0).astype(np.float32)


def apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
  """Applies a (S, S, S, 3) LUT (indexed [r, g, b]) to an (H, W, 3) uint8 image, trilinearly."""
  size = lut.shape[0]
  # PIL wants the table with red varying fastest, i.e. indexed [b, g, r].
  table = np.ascontiguousarray(lut.transpose(2, 1, 0, 3), dtype=np.float32)
  return np.array(Image.fromarray(image).filter(ImageFilter.Color3DLUT(size, table)))


# PIL's Color3DLUT (trilinear) takes 2..65 points per axis.
MAX_CUBE_SIZE = 65


def read_cube(path: str | os.PathLike) -> np.ndarray:
  """A 3-D LUT in the Adobe/Resolve `.cube` text format, as `apply_lut` takes it.

  Lines: `LUT_3D_SIZE N`, optional `TITLE`, `DOMAIN_MIN`/`DOMAIN_MAX` (only 0 0 0 / 1 1 1
  is accepted), `#` comments, then N^3 rows of output "r g b" with red varying fastest,
  then green, then blue. 1-D LUTs (`LUT_1D_SIZE`) are refused.

  Returns:
    (N, N, N, 3) float32 indexed [r, g, b], clipped to [0, 1]. Raises UserError naming the
    file and the problem.
  """
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8", errors="strict")
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"LUT {path}: unreadable ({type(e).__name__})") from None
  size, rows = None, []
  for lineno, raw in enumerate(text.splitlines(), 1):
    line = raw.split("#", 1)[0].strip()
    if not line:
      continue
    head, *rest = line.split()
    key = head.upper()
    try:
      if key == "TITLE":
        continue
      if key == "LUT_1D_SIZE":
        raise UserError(f"LUT {path}: a 1-D LUT (LUT_1D_SIZE); a 3-D LUT is needed")
      if key == "LUT_3D_SIZE":
        size = int(rest[0])
        continue
      if key in ("DOMAIN_MIN", "DOMAIN_MAX"):
        want = 0.0 if key == "DOMAIN_MIN" else 1.0
        if [float(v) for v in rest] != [want] * 3:
          raise UserError(f"LUT {path} line {lineno}: {line!r}; only the domain 0..1 is"
                          " supported")
        continue
      if key == "LUT_3D_INPUT_RANGE":
        if [float(v) for v in rest] != [0.0, 1.0]:
          raise UserError(f"LUT {path} line {lineno}: {line!r}; only the range 0..1 is"
                          " supported")
        continue
      values = [float(v) for v in line.split()]
    except (ValueError, IndexError):
      raise UserError(f"LUT {path} line {lineno}: cannot read {line!r}") from None
    if len(values) != 3:
      raise UserError(f"LUT {path} line {lineno}: expected 3 numbers, got {line!r}")
    rows.append(values)
  if size is None:
    raise UserError(f"LUT {path}: no LUT_3D_SIZE line (not a 3-D .cube file)")
  if not 2 <= size <= MAX_CUBE_SIZE:
    raise UserError(f"LUT {path}: LUT_3D_SIZE {size}; supported sizes are 2..{MAX_CUBE_SIZE}")
  if len(rows) != size ** 3:
    raise UserError(f"LUT {path}: {len(rows)} rows, LUT_3D_SIZE {size} needs {size ** 3}")
  table = np.asarray(rows, np.float32)
  if not np.isfinite(table).all():
    raise UserError(f"LUT {path}: holds non-finite values")
  # Rows run red fastest: reshaped they are [b, g, r]; apply_lut indexes [r, g, b].
  lut = table.reshape(size, size, size, 3).transpose(2, 1, 0, 3)
  return np.ascontiguousarray(np.clip(lut, 0.0, 1.0))


@functools.lru_cache(maxsize=4)
def load_lut_dir(folder: str) -> tuple[np.ndarray, ...]:
  """Every `*.cube` file under `folder` (recursively, in path order), parsed once per
  process. UserError if the folder is missing, holds none, or one does not parse."""
  root = Path(folder)
  if not root.is_dir():
    raise UserError(f"LUT folder {folder}: no such folder (data.lut_dir)")
  files = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".cube" and p.is_file())
  if not files:
    raise UserError(f"LUT folder {folder}: holds no .cube files (data.lut_dir)")
  return tuple(read_cube(p) for p in files)


def random_colour(image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig,
                  rng: np.random.Generator) -> np.ndarray:
  """Brightness, contrast, saturation, hue, gamma and a random LUT (synthetic, or one of
  `cfg.lut_dir`'s files) on the object pixels.

  Args:
    image: (E, E, 3) uint8 object, background OBJECT_FILL.
    mask: (E, E, 1) uint8 in {0, 255}.
    cfg: probabilities and ranges.
    rng: the only source of randomness.

  Returns:
    (E, E, 3) uint8; pixels outside the mask are unchanged (OBJECT_FILL).
  """
  do_jitter = rng.random() < cfg.colour_prob
  do_lut = rng.random() < cfg.lut_prob
  b = 1 + rng.uniform(-cfg.brightness, cfg.brightness)
  c = 1 + rng.uniform(-cfg.contrast, cfg.contrast)
  s = 1 + rng.uniform(-cfg.saturation, cfg.saturation)
  hue = rng.uniform(-cfg.hue, cfg.hue) * 2 * np.pi
  gamma = float(np.exp(rng.uniform(np.log(cfg.gamma[0]), np.log(cfg.gamma[1]))))
  lut_rng = np.random.default_rng(rng.integers(2**63))
  if not (do_jitter or do_lut):
    return image

  m = mask[..., 0] > 0
  out = image.copy()
  if do_jitter:
    px = image[m].astype(np.float32) / 255.0  # (N, 3): only the object is recoloured
    px = px * b
    grey = float((px @ _LUMA).mean()) if px.size else 0.0
    px = (px - grey) * c + grey
    luma = (px @ _LUMA)[:, None]
    px = luma + (px - luma) * s
    cos, sin = np.cos(hue), np.sin(hue)
    rot = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], np.float32)
    px = px @ (_YIQ_TO_RGB @ rot @ _RGB_TO_YIQ).T
    px = np.clip(px, 0.0, 1.0) ** gamma
    out[m] = np.clip(np.rint(px * 255.0), 0, 255).astype(np.uint8)
  if do_lut:
    if cfg.lut_dir:
      tables = load_lut_dir(cfg.lut_dir)
      lut = tables[int(lut_rng.integers(len(tables)))]
    else:
      lut = random_lut(lut_rng, cfg.lut_size, cfg.lut_strength)
    out = apply_lut(out, lut)
    out[~m] = schema.OBJECT_FILL
  return out
