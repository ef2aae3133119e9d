"""The methods `imprint-jax evaluate` scores, each a `GenerateFn` (test pairs -> composites):
our model, a folder of another method's outputs, the copy-and-paste baseline; and the
protocol's crop of the generated object."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from imprint_jax import compositing
from imprint_jax.data import crops
from imprint_jax.errors import UserError
from imprint_jax.evaluation.testsets import Pair

GenerateFn = Callable[[Sequence[Pair]], Sequence[np.ndarray]]
COPY_PASTE = "copy-paste"
WHITE = 255


def identity_crop(image: np.ndarray, box: Sequence[int], keep: np.ndarray | None = None
                  ) -> np.ndarray:
  """The square of side max(w, h) centred on `box`; pixels outside `keep` (if given) and
  outside the image are white. (H, W, 3) uint8 -> (S, S, 3) uint8."""
  x0, y0, x1, y1 = (int(v) for v in box)
  side = max(x1 - x0, y1 - y0)
  sx0, sy0 = x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2
  if keep is not None:
    image = np.where(keep[..., None], image, np.uint8(WHITE))
  h, w = image.shape[:2]
  out = np.full((side, side, 3), WHITE, np.uint8)
  cx0, cy0, cx1, cy1 = max(sx0, 0), max(sy0, 0), min(sx0 + side, w), min(sy0 + side, h)
  out[cy0 - sy0:cy1 - sy0, cx0 - sx0:cx1 - sx0] = image[cy0:cy1, cx0:cx1]
  return out


def erase_region(image: np.ndarray, region: np.ndarray) -> np.ndarray:
  """The region filled with the mean colour of a thin ring of pixels around it."""
  width = max(2, round(0.02 * max(image.shape[:2])))
  ring = ndimage.binary_dilation(region, iterations=width) & ~region
  around = image[ring] if ring.any() else image[~region]
  colour = around.mean(axis=0) if around.size else np.full(3, 127.5)
  out = image.copy()
  out[region] = np.rint(colour).astype(np.uint8)
  return out


def copy_paste(pair: Pair, erase: bool) -> np.ndarray:
  """The object's pixels pasted into the region's box, aspect-fit and centred, (G, G, 3)."""
  out = erase_region(pair.background, pair.region) if erase else pair.background.copy()
  obj_box = crops.bbox(pair.object_mask[..., 0] > 0)
  if obj_box is None:
    return out
  ox0, oy0, ox1, oy1 = obj_box
  ow, oh = ox1 - ox0, oy1 - oy0
  x0, y0, x1, y1 = pair.box
  scale = min((x1 - x0) / ow, (y1 - y0) / oh)
  w, h = max(1, round(ow * scale)), max(1, round(oh * scale))
  obj = np.asarray(Image.fromarray(pair.object[oy0:oy1, ox0:ox1]).resize(
      (w, h), Image.Resampling.BICUBIC))
  mask = np.asarray(Image.fromarray(pair.object_mask[oy0:oy1, ox0:ox1, 0]).resize(
      (w, h), Image.Resampling.BILINEAR)) >= 128
  px, py = x0 + (x1 - x0 - w) // 2, y0 + (y1 - y0 - h) // 2
  window = out[py:py + h, px:px + w]
  window[mask] = obj[mask]
  return out


def model_generator(ckpt: str | os.PathLike, *, steps: int = 50, guidance: float = 5.0,
                    batch_size: int = 8, seed: int = 0, dtype: str | None = None,
                    devices: Sequence[Any] | None = None, param_dtype: str | None = None,
                    shard_params: str = "auto") -> GenerateFn:
  """Compositing with a stage-2 checkpoint (`compositing.Compositor`): pair -> (G, G, 3).

  The region is passed as a level-1 mask (it is already at the chosen level); the noise of
  pair p is seeded by (seed, pair_id), so results do not depend on batching or --limit.
  `devices`: the batch mesh (default: all local devices); `param_dtype`, `shard_params`:
  the parameters' dtype and placement (`compositing.Compositor`).
  """
  compositing.check_sampling(steps, guidance, "ddim")
  comp = compositing.Compositor.from_checkpoint(ckpt, dtype=dtype, devices=devices,
                                                param_dtype=param_dtype,
                                                shard_params=shard_params)

  def generate(pairs: Sequence[Pair]) -> list[np.ndarray]:
    jobs = [comp.prepare(p.object, p.background, object_mask=p.object_mask[..., 0] > 0,
                         mask=p.region, mask_level=1,
                         seed=int(np.random.SeedSequence([seed, p.pair_id]).generate_state(1)[0]))
            for p in pairs]
    # A short last batch is padded to the full size: one compiled sampler for the whole run.
    padded = jobs + jobs[-1:] * max(0, batch_size - len(jobs))
    results = comp.run(padded, steps=steps, guidance=guidance, batch_size=batch_size)
    return [samples[0] for samples in results[:len(jobs)]]

  return generate


_ID_FILE = re.compile(r"0*(\d+)\.(png|jpg|jpeg|webp)", re.IGNORECASE)


def folder_generator(folder: str | os.PathLike) -> GenerateFn:
  """Another method's outputs, one file per pair named by pair id (e.g. 00012.png)."""
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"--images {folder}: no such folder")
  files: dict[int, Path] = {}
  for path in sorted(folder.iterdir()):
    m = _ID_FILE.fullmatch(path.name)
    if m:
      pid = int(m.group(1))
      if pid in files:
        raise UserError(f"--images {folder}: {files[pid].name} and {path.name} both hold pair"
                        f" {pid}")
      files[pid] = path
  if not files:
    raise UserError(f"--images {folder}: no images named by pair id (<pair_id>.png)")

  def generate(pairs: Sequence[Pair]) -> list[np.ndarray]:
    out = []
    for p in pairs:
      path = files.get(p.pair_id)
      if path is None:
        raise UserError(f"--images {folder}: no image for pair {p.pair_id} (expected"
                        f" {p.pair_id:05d}.png; files are named by pair id)")
      try:
        with Image.open(path) as img:
          image = np.asarray(img.convert("RGB"))
      except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable image ({type(e).__name__})") from None
      g = p.background.shape[0]
      if image.shape[0] != image.shape[1]:
        raise UserError(f"{path}: {image.shape[1]}x{image.shape[0]} is not square; expected the"
                        f" composite of the pair's {g}x{g} target crop")
      if image.shape[0] != g:
        image = np.asarray(Image.fromarray(image).resize((g, g), Image.Resampling.BICUBIC))
      out.append(image)
    return out

  return generate
