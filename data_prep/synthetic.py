"""Small synthetic datasets written in every published layout `prepare` reads.

  imprint-jax prepare --source synthetic --out data/raw --seed 0
  # or: from data_prep import synthetic; synthetic.generate("data/raw")

writes (one folder per reader, each in that reader's real layout, see data_prep/readers/):

  <out>/mvimgnet/<category>/<object>/images/001.jpg + masks/001.png
      procedurally rendered views of textured 3-D solids (cuboids, cylinders; orthographic
      ray casting in numpy) turning by a few degrees per frame over a textured table
  <out>/youtube_vos/train/JPEGImages/<video>/00000.jpg, Annotations/<video>/00000.png
      (palette PNG), train/meta.json
  <out>/vipseg/imgs/<video>/<frame>.jpg, panomasks/<video>/<frame>.png (16-bit: stuff
      1..124, things category*100+k), panoVIPSeg_categories.json, and the COCO-panoptic
      conversion panomasksRGB/<video>/<frame>.png + panoptic_gt_VIPSeg.json
  <out>/ppr10k/train/target_a/<group>_<index>.tif + train/masks/<group>_<index>.png
      portrait photo groups (a textured person figure, per-group scene)
  <out>/images/images/<name>.jpg + masks/<name>.png (instance ids) or masks/<name>/<k>.png
  <out>/dreambooth/<subject>/<k>.jpg + <subject>/masks/<k>.png (the last subject: RGBA
      PNGs, no masks folder), backgrounds/bg<j>.jpg, manifest.jsonl

Video layouts: textured objects (random shapes whose procedural texture - stripes, checks,
dots, rings or waves plus a thin accent pattern - is the object's identity) move, turn and
scale over a textured background; each object keeps to its own horizontal lane, so it is
never occluded and every annotated frame passes the default filters at the default sizes.
Everything is fixed by the seed. `inject_faults` damages a generated dataset on purpose
(truncated images, masks of the wrong size, empty masks, unreadable folders) for tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
import shutil

import numpy as np
from PIL import Image

LAYOUTS = ("mvimgnet", "youtube_vos", "vipseg", "ppr10k", "images", "dreambooth")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Size of the synthetic datasets.

  groups: videos / objects / photo groups / images / subjects per layout.
  frames: frames per video, views per object, photos per group.
  frame_size: frame height in pixels (width is 4/3 of it; PPR10K portraits are 3/4).
  objects: object instances per video or image.
  yaw_step: degrees the multi-view solids turn between frames.
  seed: fixes every pixel.
  """

  groups: int = 3
  frames: int = 6
  frame_size: int = 128
  objects: int = 2
  yaw_step: float = 12.0
  seed: int = 0


# ---------------------------------------------------------------------------------------
# Procedural textures, shapes and backgrounds.

_TEXTURES = ("stripes", "checker", "dots", "rings", "waves")
_SHAPES = ("ellipse", "rect", "blob", "polygon")


def _colour(rng: np.random.Generator) -> np.ndarray:
  """A saturated random colour, RGB in [0, 1]."""
  hue = rng.uniform(0, 6)
  c = np.array([np.clip(abs(hue - 3) - 1, 0, 1), np.clip(2 - abs(hue - 2), 0, 1),
                np.clip(2 - abs(hue - 4), 0, 1)])
  value, sat = rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)
  return value * (1 - sat + sat * c)


def make_texture(rng: np.random.Generator) -> dict:
  """Parameters of one identity texture (evaluate with `texture`)."""
  return {"kind": str(rng.choice(_TEXTURES)), "colours": np.stack([_colour(rng) for _ in range(3)]),
          "freq": float(rng.uniform(1.5, 4.0)), "angle": float(rng.uniform(0, np.pi)),
          "phase": rng.uniform(0, 2 * np.pi, 2), "accent_angle": float(rng.uniform(0, np.pi)),
          "accent_freq": float(rng.uniform(5.0, 9.0))}


def texture(tex: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Colours (..., 3) in [0, 1] of texture `tex` at object coordinates u, v (~[-1, 1])."""
  c0, c1, c2 = tex["colours"]
  f, a, (p0, p1) = tex["freq"], tex["angle"], tex["phase"]
  along = u * math.cos(a) + v * math.sin(a)
  kind = tex["kind"]
  if kind == "stripes":
    w = (np.sin(2 * np.pi * f * along + p0) > 0).astype(np.float32)
  elif kind == "checker":
    w = ((np.floor(u * f + p0) + np.floor(v * f + p1)) % 2).astype(np.float32)
  elif kind == "dots":
    gu, gv = (u * f + p0) % 1 - 0.5, (v * f + p1) % 1 - 0.5
    w = (gu ** 2 + gv ** 2 < 0.09).astype(np.float32)
  elif kind == "rings":
    w = (np.sin(2 * np.pi * f * np.sqrt(u ** 2 + v ** 2) + p0) > 0).astype(np.float32)
  else:  # waves: a smooth blend
    w = 0.5 + 0.5 * np.sin(2 * np.pi * f * u + p0) * np.cos(2 * np.pi * f * v + p1)
  out = c0 * (1 - w[..., None]) + c1 * w[..., None]
  b = tex["accent_angle"]
  accent = np.sin(2 * np.pi * tex["accent_freq"] * (u * math.cos(b) + v * math.sin(b))) > 0.9
  return np.where(accent[..., None], c2, out)


def make_shape(rng: np.random.Generator) -> dict:
  return {"kind": str(rng.choice(_SHAPES)), "aspect": float(rng.uniform(0.6, 1.0)),
          "lobes": int(rng.integers(3, 7)), "depth": float(rng.uniform(0.15, 0.3)),
          "phase": float(rng.uniform(0, 2 * np.pi)),
          "radii": rng.uniform(0.75, 1.0, int(rng.integers(5, 8)))}


def shape_mask(shape: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside-test of a shape at object coordinates (the shape fits in [-1, 1]^2)."""
  kind, aspect = shape["kind"], shape["aspect"]
  v = v / aspect
  r, theta = np.sqrt(u ** 2 + v ** 2), np.arctan2(v, u)
  if kind == "ellipse":
    return r <= 1
  if kind == "rect":
    return (np.abs(u) <= 0.9) & (np.abs(v) <= 0.9)
  if kind == "blob":
    return r <= 1 - shape["depth"] * (0.5 + 0.5 * np.sin(shape["lobes"] * theta + shape["phase"]))
  radii = shape["radii"]  # a star-shaped polygon: radius interpolated between vertices
  n = len(radii)
  t = ((theta + np.pi) / (2 * np.pi) * n) % n
  i = np.floor(t).astype(int)
  frac = t - i
  return r <= radii[i % n] * (1 - frac) + radii[(i + 1) % n] * frac


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A textured background (H, W, 3) float in [0, 1]: smooth colour noise + faint pattern."""
  grid = rng.uniform(0.15, 0.85, (4, 5, 3)).astype(np.float32)
  base = np.stack([np.asarray(Image.fromarray(grid[..., c]).resize((width, height),
                                                                 Image.Resampling.BICUBIC))
                   for c in range(3)], -1)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  pattern = texture(make_texture(rng), x / height * 2, y / height * 2)
  return np.clip(0.8 * base + 0.2 * pattern, 0, 1)


def _to_uint8(image: np.ndarray) -> np.ndarray:
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class _Sprite:
  """A textured 2-D object with a pose per frame."""

  shape: dict
  tex: dict
  centre: np.ndarray
  velocity: np.ndarray
  size: float      # half-size in pixels
  angle: float
  spin: float      # radians per frame
  growth: float    # relative size change per frame


def _draw(canvas: np.ndarray, sprite: _Sprite, t: int) -> np.ndarray:
  """Draws `sprite` at frame t onto canvas (in place); returns its (H, W) bool mask."""
  h, w = canvas.shape[:2]
  cx, cy = sprite.centre + sprite.velocity * t
  size = sprite.size * (1 + sprite.growth * t)
  angle = sprite.angle + sprite.spin * t
  y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  ca, sa = math.cos(angle), math.sin(angle)
  u = (ca * (x - cx) + sa * (y - cy)) / size
  v = (-sa * (x - cx) + ca * (y - cy)) / size
  inside = shape_mask(sprite.shape, u, v)
  shade = 1 - 0.18 * np.clip(u ** 2 + v ** 2, 0, 1)
  colour = texture(sprite.tex, u, v) * shade[..., None]
  canvas[inside] = colour[inside]
  return inside


def _lane_sprites(rng: np.random.Generator, n: int, height: int, width: int, frames: int
                  ) -> list[_Sprite]:
  """n sprites, each kept inside its own horizontal lane for all frames (no occlusion)."""
  sprites = []
  lane = height / n
  for k in range(n):
    size = min(lane * 0.42, width * 0.2) * rng.uniform(0.8, 1.0)
    span = max(1.0, width - 2.6 * size)
    start = rng.uniform(1.3 * size, 1.3 * size + span)
    end = rng.uniform(1.3 * size, 1.3 * size + span)
    velocity = np.array([(end - start) / max(frames - 1, 1), 0.0])
    cy = lane * (k + 0.5)
    sprites.append(_Sprite(make_shape(rng), make_texture(rng), np.array([start, cy]), velocity,
                           size / 1.12, float(rng.uniform(0, 2 * np.pi)),
                           float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.02, 0.02))))
  return sprites


def _save_jpeg(path: Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(image).save(path, format="JPEG", quality=92)


def _save_png(path: Path, image: Image.Image) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, format="PNG")


def _palette_png(ids: np.ndarray) -> Image.Image:
  """A palette PNG like YouTube-VOS / DAVIS annotations: pixel value = object id."""
  img = Image.fromarray(ids.astype(np.uint8), mode="P")
  palette = [0, 0, 0]
  for k in range(1, 256):
    palette += [(k * 97) % 256, (k * 57 + 80) % 256, (k * 151 + 40) % 256]
  img.putpalette(palette)
  return img


def _name(rng: np.random.Generator, n: int = 10) -> str:
  return "".join(rng.choice(list("0123456789abcdef"), n))


def _video(rng: np.random.Generator, cfg: SyntheticConfig, objects: int
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Frames (H, W, 3) uint8 and instance-id maps (H, W) int (0 = background, k = object k)."""
  h, w = cfg.frame_size, cfg.frame_size * 4 // 3
  bg = background(rng, h + 16, w + 16)
  pan = rng.uniform(-1.5, 1.5, 2)
  sprites = _lane_sprites(rng, objects, h, w, cfg.frames)
  frames, ids = [], []
  for t in range(cfg.frames):
    ox, oy = (8 + np.round(pan * t)).astype(int).clip(0, 16)
    canvas = bg[oy:oy + h, ox:ox + w].copy()
    id_map = np.zeros((h, w), np.int64)
    for k, sprite in enumerate(sprites, 1):
      id_map[_draw(canvas, sprite, t)] = k
    frames.append(_to_uint8(canvas))
    ids.append(id_map)
  return frames, ids


# ---------------------------------------------------------------------------------------
# Multi-view: textured solids rendered by orthographic ray casting.


def _rotation(yaw: float, pitch: float) -> np.ndarray:
  """Object -> camera rotation: yaw about the object's vertical axis, then pitch."""
  cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
  r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])  # tilts the top towards the camera
  return r_pitch @ r_yaw


def render_solid(solid: dict, yaw: float, pitch: float, bg: np.ndarray, scale: float,
                 offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
  """Renders a textured cuboid or cylinder over `bg` (H, W, 3) float.

  Orthographic camera looking along +z; `scale` pixels per object unit; Lambert shading.
  Returns the image (H, W, 3) uint8 and the object mask (H, W) bool.
  """
  h, w = bg.shape[:2]
  y, x = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
  px = (x - w / 2 - offset[0]) / scale
  py = (h / 2 + offset[1] - y) / scale
  rot = _rotation(yaw, pitch)
  # Rays in object space: origin R^T (px, py, -10), direction R^T (0, 0, 1).
  origin = np.stack([px, py, np.full_like(px, -10.0)], -1) @ rot
  direction = rot.T @ np.array([0.0, 0.0, 1.0])
  direction = np.where(np.abs(direction) < 1e-9, 1e-9, direction)
  light = np.array([-0.4, 0.6, -0.7]) / np.linalg.norm([-0.4, 0.6, -0.7])
  t_hit = np.full((h, w), np.inf)
  normal = np.zeros((h, w, 3))
  uv = np.zeros((h, w, 2))
  face = np.zeros((h, w), int)
  if solid["kind"] == "cuboid":
    ext = np.asarray(solid["extent"])
    t1, t2 = (-ext - origin) / direction, (ext - origin) / direction
    t_near, t_far = np.minimum(t1, t2), np.maximum(t1, t2)
    enter = t_near.max(-1)
    hit = (enter <= t_far.min(-1)) & (enter > 0)
    axis = t_near.argmax(-1)
    t_hit = np.where(hit, enter, np.inf)
    point = origin + enter[..., None] * direction
    sign = -np.sign(direction[axis])
    normal = np.eye(3)[axis] * sign[..., None]
    face = axis * 2 + (sign > 0)
    others = np.array([[1, 2], [0, 2], [0, 1]])[axis]
    uv = np.stack([np.take_along_axis(point, others[..., :1], -1)[..., 0] / ext[others[..., 0]],
                   np.take_along_axis(point, others[..., 1:], -1)[..., 0] / ext[others[..., 1]]],
                  -1)
  else:  # cylinder around the y axis
    radius, half = solid["radius"], solid["half_height"]
    ox, oy, oz = origin[..., 0], origin[..., 1], origin[..., 2]
    dx, dy, dz = direction
    a = dx * dx + dz * dz
    b = 2 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - radius ** 2
    disc = b * b - 4 * a * c
    ts = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
    side_y = oy + ts * dy
    side = (disc >= 0) & (np.abs(side_y) <= half) & (ts > 0)
    t_hit = np.where(side, ts, np.inf)
    sx, sz = ox + ts * dx, oz + ts * dz
    normal = np.where(side[..., None], np.stack([sx, np.zeros_like(sx), sz], -1) / radius, 0)
    uv = np.stack([np.arctan2(sz, sx) / np.pi * 2, side_y / half], -1)
    for cap in (half, -half):
      tc = (cap - oy) / dy
      cx, cz = ox + tc * dx, oz + tc * dz
      on = (cx * cx + cz * cz <= radius ** 2) & (tc > 0) & (tc < t_hit)
      t_hit = np.where(on, tc, t_hit)
      normal = np.where(on[..., None], np.array([0.0, np.sign(cap), 0.0]), normal)
      uv = np.where(on[..., None], np.stack([cx / radius, cz / radius], -1), uv)
      face = np.where(on, 1, face)
  mask = np.isfinite(t_hit)
  colours = np.zeros((h, w, 3))
  for f, tex in enumerate(solid["textures"]):
    sel = mask & (face == f)
    if sel.any():
      colours[sel] = texture(tex, uv[sel][:, 0], uv[sel][:, 1])
  shade = 0.35 + 0.65 * np.clip((normal @ rot.T) @ light, 0, 1)
  image = np.where(mask[..., None], colours * shade[..., None], bg)
  return _to_uint8(image), mask


def make_solid(rng: np.random.Generator) -> dict:
  if rng.uniform() < 0.5:
    return {"kind": "cuboid", "extent": rng.uniform(0.55, 1.0, 3),
            "textures": [make_texture(rng) for _ in range(6)]}
  return {"kind": "cylinder", "radius": float(rng.uniform(0.6, 0.9)),
          "half_height": float(rng.uniform(0.7, 1.0)),
          "textures": [make_texture(rng) for _ in range(2)]}


# ---------------------------------------------------------------------------------------
# Layout writers.


def write_mvimgnet(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
  h, w = cfg.frame_size, cfg.frame_size * 4 // 3
  for g in range(cfg.groups):
    category, obj = str(int(rng.integers(0, 238))), _name(rng, 8)
    folder = root / category / obj
    solid = make_solid(rng)
    bg = background(rng, h, w)
    yaw0, pitch = rng.uniform(0, 2 * np.pi), math.radians(rng.uniform(12, 28))
    scale = h * rng.uniform(0.2, 0.26)
    for t in range(cfg.frames):
      jitter = tuple(rng.uniform(-2, 2, 2))
      image, mask = render_solid(solid, yaw0 + math.radians(cfg.yaw_step) * t, pitch, bg, scale,
                                 jitter)
      _save_jpeg(folder / "images" / f"{t + 1:03d}.jpg", image)
      _save_png(folder / "masks" / f"{t + 1:03d}.png", Image.fromarray(mask.astype(np.uint8) * 255))
  return root


def write_youtube_vos(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
  split = root / "train"
  videos = {}
  for g in range(cfg.groups):
    vid = _name(rng)
    frames, ids = _video(rng, cfg, cfg.objects)
    names = [f"{5 * t:05d}" for t in range(cfg.frames)]
    for name, frame, id_map in zip(names, frames, ids):
      _save_jpeg(split / "JPEGImages" / vid / f"{name}.jpg", frame)
      _save_png(split / "Annotations" / vid / f"{name}.png", _palette_png(id_map))
    videos[vid] = {"objects": {str(k): {"category": "blob", "frames": names}
                               for k in range(1, cfg.objects + 1)}}
  split.mkdir(parents=True, exist_ok=True)
  (split / "meta.json").write_text(json.dumps({"videos": videos}, indent=1))
  return root


_VIPSEG_CATEGORIES = [  # a few entries in the format of panoVIPSeg_categories.json
    {"id": 0, "name": "wall", "isthing": 0, "color": [120, 120, 120]},
    {"id": 1, "name": "floor", "isthing": 0, "color": [80, 50, 50]},
    {"id": 60, "name": "person", "isthing": 1, "color": [150, 5, 61]},
    {"id": 62, "name": "toy", "isthing": 1, "color": [255, 0, 20]},
]


def write_vipseg(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
  coco_videos, coco_annotations = [], []
  for g in range(cfg.groups):
    video = f"{g + 1}_{_name(rng, 6)}"
    frames, ids = _video(rng, cfg, cfg.objects)
    h = frames[0].shape[0]
    horizon = int(h * rng.uniform(0.45, 0.6))
    thing_cats = [int(rng.choice([60, 62])) for _ in range(cfg.objects)]
    images, annotations = [], []
    for t, (frame, id_map) in enumerate(zip(frames, ids)):
      name = f"{t * 3 + 1:05d}"
      pano = np.zeros(id_map.shape, np.uint16)
      pano[:horizon] = 0 + 1    # stuff "wall": json id 0 -> mask value 1
      pano[horizon:] = 1 + 1    # stuff "floor": json id 1 -> mask value 2
      seg_ids = np.zeros(id_map.shape, np.int64)
      seg_ids[:horizon], seg_ids[horizon:] = 1000, 2000
      segments = [{"id": 1000, "category_id": 0, "iscrowd": 0},
                  {"id": 2000, "category_id": 1, "iscrowd": 0}]
      for k in range(1, cfg.objects + 1):
        cat = thing_cats[k - 1]
        pano[id_map == k] = (cat + 1) * 100 + k  # VIPSeg thing value: category * 100 + k
        seg = (cat + 1) * 1000 + k
        seg_ids[id_map == k] = seg
        segments.append({"id": seg, "category_id": cat, "iscrowd": 0})
      for s in segments:
        s["area"] = int((seg_ids == s["id"]).sum())
      segments = [s for s in segments if s["area"] > 0]
      _save_jpeg(root / "imgs" / video / f"{name}.jpg", frame)
      _save_png(root / "panomasks" / video / f"{name}.png", Image.fromarray(pano))
      rgb = np.stack([seg_ids % 256, seg_ids // 256 % 256, seg_ids // 65536], -1)
      _save_png(root / "panomasksRGB" / video / f"{name}.png",
                Image.fromarray(rgb.astype(np.uint8)))
      images.append({"id": name, "width": frame.shape[1], "height": h,
                     "file_name": f"{name}.png"})
      annotations.append({"image_id": name, "file_name": f"{name}.png",
                          "segments_info": segments})
    coco_videos.append({"video_id": video, "images": images})
    coco_annotations.append({"video_id": video, "annotations": annotations})
  (root / "panoVIPSeg_categories.json").write_text(json.dumps(_VIPSEG_CATEGORIES))
  (root / "panoptic_gt_VIPSeg.json").write_text(json.dumps(
      {"videos": coco_videos, "annotations": coco_annotations, "categories": _VIPSEG_CATEGORIES}))
  return root


def _person(rng: np.random.Generator) -> dict:
  return {"clothes": make_texture(rng), "skin": np.array([0.85, 0.65, 0.5]) * rng.uniform(0.7, 1.0),
          "hair": _colour(rng) * 0.4}


def _draw_person(canvas: np.ndarray, person: dict, cx: float, top: float, height: float
                 ) -> np.ndarray:
  """A simple portrait figure: head and shoulders; returns its mask."""
  h, w = canvas.shape[:2]
  y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  head_r = 0.16 * height
  head_c = np.array([cx, top + head_r])
  head = (x - head_c[0]) ** 2 + (y - head_c[1]) ** 2 <= head_r ** 2
  neck_top = top + 1.9 * head_r
  body_h = height - (neck_top - top)
  rel = (y - neck_top) / max(body_h, 1)
  half_width = (0.22 + 0.2 * np.clip(rel, 0, 1)) * height
  body = (rel >= 0) & (rel <= 1) & (np.abs(x - cx) <= half_width)
  u, v = (x - cx) / (0.3 * height), (y - neck_top) / (0.3 * height)
  canvas[body] = texture(person["clothes"], u, v)[body]
  canvas[head] = person["skin"]
  hair = head & (y < head_c[1] - 0.3 * head_r)
  canvas[hair] = person["hair"]
  return head | body


def write_ppr10k(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
  split = root / "train"
  h, w = cfg.frame_size, cfg.frame_size * 3 // 4
  for g in range(cfg.groups):
    person = _person(rng)
    scene = background(rng, h + 20, w + 20)
    for i in range(cfg.frames):
      ox, oy = rng.integers(0, 21, 2)
      canvas = scene[oy:oy + h, ox:ox + w].copy()
      height = h * rng.uniform(0.55, 0.75)
      cx = w * rng.uniform(0.4, 0.6)
      top = rng.uniform(0.1, 0.95) * (h - height)
      mask = _draw_person(canvas, person, cx, top, height)
      stem = f"{g}_{i}"
      (split / "target_a").mkdir(parents=True, exist_ok=True)
      Image.fromarray(_to_uint8(canvas)).save(split / "target_a" / f"{stem}.tif", format="TIFF")
      _save_png(split / "masks" / f"{stem}.png", Image.fromarray(mask.astype(np.uint8) * 255))
  return root


def write_images(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
  h, w = cfg.frame_size, cfg.frame_size * 4 // 3
  one = dataclasses.replace(cfg, frames=1)
  for g in range(cfg.groups):
    name = f"img_{g:04d}_{_name(rng, 6)}"
    frames, ids = _video(rng, one, cfg.objects)
    _save_jpeg(root / "images" / f"{name}.jpg", frames[0])
    if g % 2 == 0:  # an instance-id PNG
      _save_png(root / "masks" / f"{name}.png", Image.fromarray(ids[0].astype(np.uint8)))
    else:  # one binary PNG per instance
      for k in range(1, cfg.objects + 1):
        _save_png(root / "masks" / name / f"{k}.png",
                  Image.fromarray((ids[0] == k).astype(np.uint8) * 255))
  return root


def write_dreambooth(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
  h, w = cfg.frame_size, cfg.frame_size * 4 // 3
  subjects = max(2, cfg.groups)
  backgrounds = []
  for j in range(max(2, cfg.groups)):
    rel = f"backgrounds/bg{j}.jpg"
    bh, bw = int(h * rng.uniform(1.0, 1.5)), int(w * rng.uniform(1.0, 1.5))
    _save_jpeg(root / rel, _to_uint8(background(rng, bh, bw)))
    backgrounds.append((rel, bw, bh))
  lines = []
  for s in range(subjects):
    subject = f"subject_{s}"
    solid = make_solid(rng)
    rgba = s == subjects - 1  # the last subject comes as RGBA cut-outs, no masks folder
    photos = []
    for k in range(3):
      bg = background(rng, h, h)
      image, mask = render_solid(solid, rng.uniform(0, 2 * np.pi),
                                 math.radians(rng.uniform(10, 30)), bg, h * 0.24)
      if rgba:
        photo = f"{k:02d}.png"
        alpha = mask.astype(np.uint8) * 255
        _save_png(root / subject / photo, Image.fromarray(np.dstack([image, alpha]), "RGBA"))
      else:
        photo = f"{k:02d}.jpg"
        _save_jpeg(root / subject / photo, image)
        _save_png(root / subject / "masks" / f"{k:02d}.png",
                  Image.fromarray(mask.astype(np.uint8) * 255))
      photos.append(photo)
    for k in range(2):
      rel, bw, bh = backgrounds[int(rng.integers(len(backgrounds)))]
      side = int(min(bw, bh) * rng.uniform(0.3, 0.5))
      x0, y0 = int(rng.integers(0, bw - side)), int(rng.integers(0, bh - side))
      lines.append({"subject": subject, "image": photos[k], "background": rel,
                    "box": [x0, y0, x0 + side, y0 + int(side * rng.uniform(0.8, 1.0))]})
  (root / "manifest.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  return root


WRITERS = {"mvimgnet": write_mvimgnet, "youtube_vos": write_youtube_vos, "vipseg": write_vipseg,
           "ppr10k": write_ppr10k, "images": write_images, "dreambooth": write_dreambooth}


def generate(out, cfg: SyntheticConfig = SyntheticConfig(),
             layouts: tuple[str, ...] = LAYOUTS) -> dict[str, Path]:
  """Writes a synthetic dataset per layout under `out`; returns {source: --root to use}.

  Each layout's content depends only on (seed, layout), so a subset is identical to the
  same layouts of a full generation.
  """
  out = Path(out)
  roots = {}
  for name in layouts:
    if name not in WRITERS:
      raise ValueError(f"unknown layout {name!r}; choose from {LAYOUTS}")
    rng = np.random.default_rng([cfg.seed, LAYOUTS.index(name)])
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    roots[name] = WRITERS[name](folder, cfg, rng)
  return roots


# ---------------------------------------------------------------------------------------
# Fault injection (tests).


def inject_faults(root, source: str, *, corrupt_image: int = 0, mask_size_mismatch: int = 0,
                  empty_mask: int = 0, unreadable_folder: int = 0, seed: int = 0
                  ) -> dict[str, list[str]]:
  """Damages a generated dataset of layout `source` in place; returns what was changed.

  corrupt_image: images truncated to half their bytes;
  mask_size_mismatch: mask files resized to a size different from their image;
  empty_mask: mask files cleared to 0;
  unreadable_folder: groups whose folder (reader.group_folder) is replaced by a plain file.
  Every fault hits a different frame, and no frame of an unreadable group, so each shows
  up in the prepare summary on its own (for masks holding several instances, an empty mask
  is counted once per instance).
  """
  from imprint_jax.data_prep.readers import READERS
  reader = READERS[source]
  rroot = reader.resolve_root(Path(root))
  groups, _ = reader.list_groups(rroot)
  rng = np.random.default_rng(seed)
  order = [groups[i] for i in rng.permutation(len(groups))]
  done: dict[str, list[str]] = {"corrupt_image": [], "mask_size_mismatch": [], "empty_mask": [],
                                "unreadable_folder": []}
  frames = []
  for group in order:
    folder = reader.group_folder(rroot, group)
    if len(done["unreadable_folder"]) < unreadable_folder and folder is not None:
      if folder.exists():
        shutil.rmtree(folder)
      folder.write_text("this used to be a folder\n")
      done["unreadable_folder"].append(str(folder.relative_to(rroot)))
      continue
    frames.extend(reader.group_frames(rroot, group))
  if len(done["unreadable_folder"]) < unreadable_folder:
    raise ValueError(f"{source}: cannot make {unreadable_folder} unreadable folders")
  used_images, used_masks = set(), set()
  pool = [frames[i] for i in rng.permutation(len(frames))]
  for kind, count in (("corrupt_image", corrupt_image), ("mask_size_mismatch", mask_size_mismatch),
                      ("empty_mask", empty_mask)):
    for frame in pool:
      if len(done[kind]) >= count:
        break
      if frame.image in used_images or (frame.mask and frame.mask in used_masks):
        continue
      if kind != "corrupt_image" and not frame.mask:
        continue
      used_images.add(frame.image)
      used_masks.add(frame.mask)
      if kind == "corrupt_image":
        path = rroot / frame.image
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
        done[kind].append(frame.image)
      else:
        path = rroot / frame.mask
        mask = Image.open(path)
        mask.load()
        if kind == "mask_size_mismatch":
          changed = mask.resize((mask.width + 7, mask.height + 3), Image.Resampling.NEAREST)
        else:
          changed = Image.new(mask.mode, mask.size, 0)
          if mask.mode == "P":
            changed.putpalette(mask.getpalette())
        changed.save(path, format="PNG")
        done[kind].append(frame.mask)
    if len(done[kind]) < count:
      raise ValueError(f"{source}: not enough frames for {count} {kind} faults")
  return done
