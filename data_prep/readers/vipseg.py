"""VIPSeg (video panoptic segmentation) -> stage-2 "video" pairs; only "thing" instances.

Two layouts are read (`--root` is the folder holding them):

1. The release as downloaded (VIPSeg-Dataset README):

  <root>/imgs/<video>/<frame>.jpg
  <root>/panomasks/<video>/<frame>.png   16-bit PNG; 0 = void, values 1..124 = "stuff"
                                         category, values >= 125 = "thing" instance with
                                         value = category * 100 + instance (e.g. 6100, 6101)
  (<root>/panoVIPSeg_categories.json is not needed in this layout)

2. The COCO-panoptic conversion made by the release's scripts (change2_720p.py +
   create_panoptic_video_labels.py), used when panoptic_gt_VIPSeg.json exists:

  <root>/images/<video>/<frame>.jpg      (or imgs/)
  <root>/panomasksRGB/<video>/<frame>.png   RGB PNG, segment id = R + 256 G + 256^2 B
  <root>/panoptic_gt_VIPSeg.json         {"videos": [{"video_id", "images": [{"id",
                                           "file_name", "width", "height"}]}],
                                          "annotations": [{"video_id", "annotations":
                                           [{"image_id", "file_name", "segments_info":
                                             [{"id", "category_id", "iscrowd", ...}]}]}],
                                          "categories": [{"id", "name", "isthing", ...}]}
                                         segment ids are stable across a video's frames;
                                         only segments whose category has isthing = 1 count.

One group = one video; pairs as for YouTube-VOS (same instance, two distinct frames).
"""

from __future__ import annotations

import json
from pathlib import Path

from imprint_jax.errors import UserError
from imprint_jax.data_prep.readers import common

NAME = "vipseg"
KIND = "video"
LAYOUT = __doc__
COCO_JSON = "panoptic_gt_VIPSeg.json"


def _images_dir(root: Path) -> str:
  return "images" if (root / "images").is_dir() else "imgs"


def resolve_root(root: Path) -> Path:
  for candidate in (root, root / "VIPSeg_720P"):
    if (candidate / COCO_JSON).is_file() or (candidate / "panomasks").is_dir():
      return candidate
  raise UserError(f"--root {root}: neither panomasks/ nor {COCO_JSON} found "
                  "(expected the VIPSeg layout, see `data_prep/readers/vipseg.py`)")


def list_groups(root: Path):
  if not (root / COCO_JSON).is_file():
    return [common.Group(v) for v in common.list_dir(root / "panomasks", dirs=True)], {}
  path = root / COCO_JSON
  try:
    data = json.loads(path.read_text())
    things = {int(c["id"]) for c in data["categories"] if int(c.get("isthing", 0)) == 1}
    groups = []
    for video in sorted(data["annotations"], key=lambda v: str(v["video_id"])):
      frames = []
      for ann in video["annotations"]:
        segments = tuple(sorted((str(int(s["id"])), int(s["id"])) for s in ann["segments_info"]
                                if int(s["category_id"]) in things))
        frames.append((str(ann["image_id"]), str(ann["file_name"]), segments))
      groups.append(common.Group(str(video["video_id"]), sorted(frames)))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path}: not a VIPSeg panoptic json ({type(e).__name__}: {e})") from e
  return groups, {}


def group_folder(root: Path, group: common.Group) -> Path:
  if group.payload is None:
    return root / "panomasks" / group.key
  return root / _images_dir(root) / group.key


def group_frames(root: Path, group: common.Group) -> list[common.Frame]:
  images = _images_dir(root)
  if group.payload is None:  # the raw release
    names = [n for n in common.list_dir(root / "panomasks" / group.key, dirs=False)
             if n.endswith(".png")]
    return [common.Frame(image=f"{images}/{group.key}/{n[:-4]}.jpg",
                         mask=f"panomasks/{group.key}/{n}", index=i, decode="vipseg")
            for i, n in enumerate(names)]
  common.list_dir(root / images / group.key)  # an unreadable video folder skips the video
  return [common.Frame(image=f"{images}/{group.key}/{image_id}.jpg",
                       mask=f"panomasksRGB/{group.key}/{file_name}", index=i, decode="rgb",
                       instances=segments)
          for i, (image_id, file_name, segments) in enumerate(group.payload)]


def make_pairs(views, cfg, rng):
  return common.pairs_per_instance(views, cfg, rng)
