"""YouTube-VOS (video object segmentation) -> stage-2 "video" pairs.

Expected layout (`--root` is a split folder, or the dataset folder holding `train/`, which
is then used; only `train` has masks on every annotated frame):

  <root>/JPEGImages/<video>/<frame>.jpg      frames (every 5th frame is annotated)
  <root>/Annotations/<video>/<frame>.png     palette PNG, pixel value = object id, 0 = none
  <root>/meta.json                           {"videos": {"<video>": {"objects": {"<id>":
                                               {"category": "...", "frames": ["00000", ...]}}}}}

One group = one video. For each object, the frames listed in meta.json are its views; pairs
are up to --pairs-per-instance ordered pairs of two distinct frames: the target is one frame,
the object is cut from the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from imprint_jax.errors import UserError
from imprint_jax.data_prep.readers import common

NAME = "youtube_vos"
KIND = "video"
LAYOUT = __doc__


def resolve_root(root: Path) -> Path:
  if (root / "meta.json").is_file():
    return root
  if (root / "train" / "meta.json").is_file():
    return root / "train"
  raise UserError(f"--root {root}: no meta.json (or train/meta.json) found "
                  "(expected the YouTube-VOS layout, see `data_prep/readers/youtube_vos.py`)")


def list_groups(root: Path):
  path = root / "meta.json"
  try:
    videos = json.loads(path.read_text())["videos"]
    groups = []
    for vid in sorted(videos):
      objects = {str(int(k)): [str(f) for f in v["frames"]]
                 for k, v in videos[vid]["objects"].items()}
      groups.append(common.Group(vid, objects))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{path}: not a YouTube-VOS meta.json ({type(e).__name__}: {e}); expected "
                    '{"videos": {vid: {"objects": {id: {"frames": [...]}}}}}') from e
  return groups, {}


def group_folder(root: Path, group: common.Group) -> Path:
  return root / "JPEGImages" / group.key


def group_frames(root: Path, group: common.Group) -> list[common.Frame]:
  common.list_dir(root / "JPEGImages" / group.key)  # an unreadable video folder skips the video
  per_frame: dict[str, list[tuple[str, int]]] = {}
  for obj, frames in group.payload.items():
    for f in frames:
      per_frame.setdefault(f, []).append((obj, int(obj)))
  out = []
  for position, f in enumerate(sorted(per_frame)):
    out.append(common.Frame(
        image=f"JPEGImages/{group.key}/{f}.jpg", mask=f"Annotations/{group.key}/{f}.png",
        index=int(f) if f.isdigit() else position, decode="index",
        instances=tuple(sorted(per_frame[f]))))
  return out


def make_pairs(views, cfg, rng):
  return common.pairs_per_instance(views, cfg, rng)
