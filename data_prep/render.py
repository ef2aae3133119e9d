"""Procedural pictures for the synthetic datasets: textures, shapes, backgrounds, sprites,
ray-cast solids and portrait figures (numpy only; every draw from the caller's generator).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image


# ---------------------------------------------------------------------------------------
# Procedural textures, shapes and backgrounds.

_TEXTURES = ("stripes", "checker", "dots", "rings", "waves")
_SHAPES = ("ellipse", "rect", "blob", "polygon")


def colour(rng: np.random.Generator) -> np.ndarray:
  """A saturated random colour, RGB in [0, 1]."""
  hue = rng.uniform(0, 6)
  c = np.array([np.clip(abs(hue - 3) - 1, 0, 1), np.clip(2 - abs(hue - 2), 0, 1),
                np.clip(2 - abs(hue - 4), 0, 1)])
  value, sat = rng.uniform(0.55, 1.0), rng.uniform(0.5, 1.0)
  return value * (1 - sat + sat * c)


def make_texture(rng: np.random.Generator) -> dict:
  """Parameters of one identity texture (evaluate with `texture`)."""
  return {"kind": str(rng.choice(_TEXTURES)), "colours": np.stack([colour(rng) for _ in range(3)]),
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


def to_uint8(image: np.ndarray) -> np.ndarray:
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class Sprite:
  """A textured 2-D object with a pose per frame."""

  shape: dict
  tex: dict
  centre: np.ndarray
  velocity: np.ndarray
  size: float      # half-size in pixels
  angle: float
  spin: float      # radians per frame
  growth: float    # relative size change per frame


def draw_sprite(canvas: np.ndarray, sprite: Sprite, t: int) -> np.ndarray:
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
  paint = texture(sprite.tex, u, v) * shade[..., None]
  canvas[inside] = paint[inside]
  return inside


def lane_sprites(rng: np.random.Generator, n: int, height: int, width: int, frames: int
                  ) -> list[Sprite]:
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
    sprites.append(Sprite(make_shape(rng), make_texture(rng), np.array([start, cy]), velocity,
                           size / 1.12, float(rng.uniform(0, 2 * np.pi)),
                           float(rng.uniform(-0.15, 0.15)), float(rng.uniform(-0.02, 0.02))))
  return sprites


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
  return to_uint8(image), mask


def make_solid(rng: np.random.Generator) -> dict:
  if rng.uniform() < 0.5:
    return {"kind": "cuboid", "extent": rng.uniform(0.55, 1.0, 3),
            "textures": [make_texture(rng) for _ in range(6)]}
  return {"kind": "cylinder", "radius": float(rng.uniform(0.6, 0.9)),
          "half_height": float(rng.uniform(0.7, 1.0)),
          "textures": [make_texture(rng) for _ in range(2)]}


# ---------------------------------------------------------------------------------------
# Portraits (PPR10K).


def make_person(rng: np.random.Generator) -> dict:
  return {"clothes": make_texture(rng), "skin": np.array([0.85, 0.65, 0.5]) * rng.uniform(0.7, 1.0),
          "hair": colour(rng) * 0.4}


def draw_person(canvas: np.ndarray, person: dict, cx: float, top: float, height: float
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
