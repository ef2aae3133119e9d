"""MVImgNet (multi-view object videos) -> stage-1 "multiview" pairs.

Expected layout (`--root` is the folder holding the category folders; MVImgNet 2.0 ships the
`masks/` folder, for MVImgNet 1.0 put the object masks there yourself):

  <root>/<category>/<object>/images/<frame>.jpg     frames of one object video, sorted by name
  <root>/<category>/<object>/masks/<frame>.png      object mask of that frame (also accepted:
                                                    masks/<frame>.jpg.png); binary, object
                                                    where >= 128 (or 1 in a 0/1 mask)
  (sparse/ and any other folder are ignored)

One group = one object (key '<category>/<object>'). With --pairing views (the default) every
valid view is kept (kind "view" records and `views-<split>.json`) and training draws a fresh
pair (view i, view j), 1 <= |i - j| <= data.window, each time it visits the object. With
--pairing pairs: up to --pairs-per-instance ordered pairs (view i, view j), i != j,
|i - j| <= --window, fixed here. i and j are positions in the sorted frame list; the object is
cut from view i, the target is view j.
"""

from __future__ import annotations

from pathlib import Path

from imprint_jax.errors import UserError
from imprint_jax.data.crops import BadFile
from imprint_jax.data_prep.readers import common

NAME = "mvimgnet"
KIND = "multiview"
LAYOUT = __doc__


def resolve_root(root: Path) -> Path:
  for category in common.list_dir(root, dirs=True):
    try:
      objects = common.list_dir(root / category, dirs=True)
    except BadFile:
      continue
    if any((root / category / obj / "images").is_dir() for obj in objects):
      return root
  raise UserError(f"--root {root}: no <category>/<object>/images/ folders found "
                  "(expected the MVImgNet layout, see `data_prep/readers/mvimgnet.py`)")


def list_groups(root: Path):
  groups, skipped = [], {}
  for category in common.list_dir(root, dirs=True):
    try:
      objects = common.list_dir(root / category, dirs=True)
    except BadFile as e:
      skipped[e.reason] = skipped.get(e.reason, 0) + 1
      continue
    groups.extend(common.Group(f"{category}/{obj}") for obj in objects)
  if not groups:
    raise UserError(f"--root {root}: no <category>/<object>/ folders found (MVImgNet layout)")
  return groups, skipped


def group_folder(root: Path, group: common.Group) -> Path:
  return root / group.key / "images"


def group_frames(root: Path, group: common.Group) -> list[common.Frame]:
  images = [n for n in common.list_dir(root / group.key / "images", dirs=False)
            if common.is_image(n)]
  masks_dir = root / group.key / "masks"
  masks = set(common.list_dir(masks_dir, dirs=False)) if masks_dir.is_dir() else set()
  frames = []
  for i, name in enumerate(images):
    stem = name.rsplit(".", 1)[0]
    mask = f"{name}.png" if f"{name}.png" in masks and f"{stem}.png" not in masks else f"{stem}.png"
    frames.append(common.Frame(image=f"{group.key}/images/{name}",
                               mask=f"{group.key}/masks/{mask}", index=i, decode="binary",
                               instances=(("object", None),)))
  return frames


def make_pairs(views, cfg, rng):
  return common.pairs_per_instance(views, cfg, rng, window=cfg.window)
