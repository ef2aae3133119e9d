"""PPR10K (portrait photo groups with human-region masks) -> stage-2 "video" pairs.

Expected layout (`--root` is a split folder of PPR10K's train_val_images_tif_360p, or the
folder holding `train/` and `val/`, which are then both read):

  <root>/<photos>/<group>_<index>.<ext>    photos of one shoot; <photos> is the first of
                                           target_a, target_b, target_c, images, source that
                                           exists (source holds 16-bit TIFFs that Pillow may
                                           not decode: prefer an 8-bit retouched target_*)
  <root>/<masks>/<group>_<index>.png       human-region mask, 0/255; <masks> is masks,
                                           masks_360p or masks_full

One group = one photo group (key '<split folder>/<group>'). The person is the instance; pairs
are up to --pairs-per-instance ordered pairs of two distinct photos of the group.
"""

from __future__ import annotations

import re
from pathlib import Path

from imprint_jax.errors import UserError
from imprint_jax.data_prep.readers import common

NAME = "ppr10k"
KIND = "video"
LAYOUT = __doc__
PHOTO_DIRS = ("target_a", "target_b", "target_c", "images", "source")
MASK_DIRS = ("masks", "masks_360p", "masks_full")
_STEM = re.compile(r"^(?P<group>[^_]+)_(?P<index>\d+)$")


def _dirs(folder: Path) -> tuple[str, str] | None:
  photos = next((d for d in PHOTO_DIRS if (folder / d).is_dir()), None)
  masks = next((d for d in MASK_DIRS if (folder / d).is_dir()), None)
  return (photos, masks) if photos and masks else None


def _split_folders(root: Path) -> list[str]:
  if _dirs(root):
    return [""]
  return [d for d in ("train", "val") if _dirs(root / d)]


def resolve_root(root: Path) -> Path:
  if not _split_folders(root):
    raise UserError(f"--root {root}: no photo folder ({'/'.join(PHOTO_DIRS)}) next to a mask "
                    f"folder ({'/'.join(MASK_DIRS)}) found, here or in train/ or val/ "
                    "(expected the PPR10K layout, see `data_prep/readers/ppr10k.py`)")
  return root


def list_groups(root: Path):
  groups = []
  for sub in _split_folders(root):
    folder = root / sub if sub else root
    photos, masks = _dirs(folder)
    members: dict[str, list[tuple[int, str]]] = {}
    for name in common.list_dir(folder / photos, dirs=False):
      m = _STEM.match(name.rsplit(".", 1)[0])
      if m and common.is_image(name):
        members.setdefault(m["group"], []).append((int(m["index"]), name))
    prefix = f"{sub}/" if sub else ""
    for g in sorted(members):
      names = [n for _, n in sorted(members[g])]
      pairs = tuple((f"{prefix}{photos}/{n}", f"{prefix}{masks}/{n.rsplit('.', 1)[0]}.png")
                    for n in names)
      groups.append(common.Group(f"{prefix}{g}", pairs))
  return groups, {}


def group_folder(root: Path, group: common.Group) -> None:
  return None  # a group is a set of files, not a folder


def group_frames(root: Path, group: common.Group) -> list[common.Frame]:
  return [common.Frame(image=image, mask=mask, index=i, decode="binary",
                       instances=(("person", None),))
          for i, (image, mask) in enumerate(group.payload)]


def make_pairs(views, cfg, rng):
  return common.pairs_per_instance(views, cfg, rng)
