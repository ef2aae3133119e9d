"""Image + instance-mask folders (Pixabay-style) -> stage-2 "image" records.

Expected layout (`--root` is the folder holding images/ and masks/):

  <root>/images/<name>.<jpg|jpeg|png|webp|...>
  <root>/masks/<name>.png         instance-id PNG (grey or palette): 0 = background, every
                                  other value 1..255 is one instance
  or
  <root>/masks/<name>/<k>.png     one binary mask (>= 128, or 1 in a 0/1 mask) per instance k

One group = one image (key '<name>'). Each valid instance gives one record whose object and
target come from the same image (kind "image"): the pair is made at training time by
augmenting the object. With --instances largest only the image's largest valid instance does
(the Pixabay test set: one object per image).
"""

from __future__ import annotations

from pathlib import Path

from imprint_jax.errors import UserError
from imprint_jax.data_prep.readers import common

NAME = "images"
KIND = "image"
LAYOUT = __doc__


def resolve_root(root: Path) -> Path:
  if not ((root / "images").is_dir() and (root / "masks").is_dir()):
    raise UserError(f"--root {root}: images/ and masks/ folders not found "
                    "(expected the image + instance-mask layout, see "
                    "`data_prep/readers/images.py`)")
  return root


def list_groups(root: Path):
  groups = []
  for name in common.list_dir(root / "images", dirs=False):
    if common.is_image(name):
      groups.append(common.Group(name.rsplit(".", 1)[0], name))
  return groups, {}


def group_folder(root: Path, group: common.Group) -> Path:
  return root / "masks" / group.key  # only exists for per-instance mask folders


def group_frames(root: Path, group: common.Group) -> list[common.Frame]:
  image = f"images/{group.payload}"
  folder = root / "masks" / group.key
  if folder.exists() or folder.is_symlink():
    names = [n for n in common.list_dir(folder, dirs=False) if n.endswith(".png")]
    return [common.Frame(image=image, mask=f"masks/{group.key}/{n}", index=0, decode="binary",
                         instances=((n[:-4], None),)) for n in names]
  return [common.Frame(image=image, mask=f"masks/{group.key}.png", index=0, decode="index")]


def make_pairs(views, cfg, rng):
  return [(v, v) for v in views]
