"""Small synthetic datasets written in every published layout `prepare` reads.

  imprint-jax prepare --source synthetic --out data/raw --seed 0
  # or: from imprint_jax.data_prep import synthetic; synthetic.generate("data/raw")

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
The pictures themselves are drawn by `render`. Everything is fixed by the seed (a layout's
content by (seed, layout)). `inject_faults` damages a generated dataset on purpose
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

from imprint_jax.data_prep import render
from imprint_jax.data_prep.readers import READERS

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
# Files and videos.


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
  bg = render.background(rng, h + 16, w + 16)
  pan = rng.uniform(-1.5, 1.5, 2)
  sprites = render.lane_sprites(rng, objects, h, w, cfg.frames)
  frames, ids = [], []
  for t in range(cfg.frames):
    ox, oy = (8 + np.round(pan * t)).astype(int).clip(0, 16)
    canvas = bg[oy:oy + h, ox:ox + w].copy()
    id_map = np.zeros((h, w), np.int64)
    for k, sprite in enumerate(sprites, 1):
      id_map[render.draw_sprite(canvas, sprite, t)] = k
    frames.append(render.to_uint8(canvas))
    ids.append(id_map)
  return frames, ids


# ---------------------------------------------------------------------------------------
# Layout writers.


def write_mvimgnet(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
  h, w = cfg.frame_size, cfg.frame_size * 4 // 3
  for g in range(cfg.groups):
    category, obj = str(int(rng.integers(0, 238))), _name(rng, 8)
    folder = root / category / obj
    solid = render.make_solid(rng)
    bg = render.background(rng, h, w)
    yaw0, pitch = rng.uniform(0, 2 * np.pi), math.radians(rng.uniform(12, 28))
    scale = h * rng.uniform(0.2, 0.26)
    for t in range(cfg.frames):
      jitter = tuple(rng.uniform(-2, 2, 2))
      image, mask = render.render_solid(solid, yaw0 + math.radians(cfg.yaw_step) * t, pitch, bg,
                                        scale, jitter)
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



def write_ppr10k(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
  split = root / "train"
  h, w = cfg.frame_size, cfg.frame_size * 3 // 4
  for g in range(cfg.groups):
    person = render.make_person(rng)
    scene = render.background(rng, h + 20, w + 20)
    for i in range(cfg.frames):
      ox, oy = rng.integers(0, 21, 2)
      canvas = scene[oy:oy + h, ox:ox + w].copy()
      height = h * rng.uniform(0.55, 0.75)
      cx = w * rng.uniform(0.4, 0.6)
      top = rng.uniform(0.1, 0.95) * (h - height)
      mask = render.draw_person(canvas, person, cx, top, height)
      stem = f"{g}_{i}"
      (split / "target_a").mkdir(parents=True, exist_ok=True)
      Image.fromarray(render.to_uint8(canvas)).save(split / "target_a" / f"{stem}.tif",
                                                    format="TIFF")
      _save_png(split / "masks" / f"{stem}.png", Image.fromarray(mask.astype(np.uint8) * 255))
  return root


def write_images(root: Path, cfg: SyntheticConfig, rng: np.random.Generator) -> Path:
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
    _save_jpeg(root / rel, render.to_uint8(render.background(rng, bh, bw)))
    backgrounds.append((rel, bw, bh))
  lines = []
  for s in range(subjects):
    subject = f"subject_{s}"
    solid = render.make_solid(rng)
    rgba = s == subjects - 1  # the last subject comes as RGBA cut-outs, no masks folder
    photos = []
    for k in range(3):
      bg = render.background(rng, h, h)
      image, mask = render.render_solid(solid, rng.uniform(0, 2 * np.pi),
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
