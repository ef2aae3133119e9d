"""DreamBooth subjects + chosen backgrounds -> "test" records.

Expected layout (`--root` is the folder holding the subject folders, i.e. DreamBooth's
`dataset/`, plus your backgrounds and manifest):

  <root>/<subject>/<image>.jpg        subject photos (DreamBooth's own files)
  <root>/<subject>/masks/<stem>.png   binary object mask of that photo (>= 128); if absent,
                                      the photo must be an RGBA PNG whose alpha is the mask
  <root>/<any path>.jpg               background images, anywhere under the root
  <root>/manifest.jsonl               one test pair per line:
    {"subject": "dog", "image": "00.jpg", "background": "backgrounds/beach.jpg",
     "box": [x0, y0, x1, y1]}
                                      box in background pixels (x1, y1 exclusive) where the
                                      subject goes; "image" defaults to the subject's first
                                      photo (sorted by name)

One group = one subject. Every manifest line gives one record of kind "test": object = the
segmented subject photo; target = the background crop around the box (same square rule as
the training targets); target_mask = the box region; box = the box in the crop. Only the
validity checks apply to test subjects (corrupt, missing, size mismatch, empty mask), not the
area/size/connectivity filters. All records go to the split "test".
"""

from __future__ import annotations

import json
from pathlib import Path

from imprint_jax.errors import UserError
from imprint_jax.data_prep.readers import common

NAME = "dreambooth"
KIND = "test"
LAYOUT = __doc__
MANIFEST = "manifest.jsonl"


def resolve_root(root: Path) -> Path:
  if not (root / MANIFEST).is_file():
    raise UserError(f"--root {root}: {MANIFEST} not found "
                    "(expected the DreamBooth layout, see `data_prep/readers/dreambooth.py`)")
  return root


def list_groups(root: Path):
  path = root / MANIFEST
  entries: dict[str, list] = {}
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise UserError(f"{path}: cannot be read ({e})") from e
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
      box = tuple(int(round(float(v))) for v in item["box"])
      if len(box) != 4:
        raise ValueError("box needs 4 numbers")
      entry = (number, str(item.get("image", "")), str(item["background"]), box)
      entries.setdefault(str(item["subject"]), []).append(entry)
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"{path}:{number}: bad manifest line ({type(e).__name__}: {e}); expected "
                      '{"subject": ..., "image": ..., "background": ..., "box": [x0, y0, x1, y1]}'
                      ) from e
  return [common.Group(s, tuple(entries[s])) for s in sorted(entries)], {}


def group_folder(root: Path, group: common.Group) -> Path:
  return root / group.key


def _photos(root: Path, group: common.Group) -> list[str]:
  return [n for n in common.list_dir(root / group.key, dirs=False) if common.is_image(n)]


def _frame(root: Path, subject: str, image: str, index: int) -> common.Frame:
  stem = image.rsplit(".", 1)[0]
  mask = f"{subject}/masks/{stem}.png"
  if (root / mask).exists():
    return common.Frame(image=f"{subject}/{image}", mask=mask, index=index, decode="binary",
                        instances=(("subject", None),))
  return common.Frame(image=f"{subject}/{image}", mask="", index=index, decode="alpha",
                      instances=(("subject", None),))


def group_frames(root: Path, group: common.Group) -> list[common.Frame]:
  photos = _photos(root, group)
  wanted = sorted({image or (photos[0] if photos else "") for _, image, _, _ in group.payload})
  return [_frame(root, group.key, image, photos.index(image) if image in photos else -1)
          for image in wanted if image]


def make_test_pairs(root: Path, group: common.Group, views: list[common.View]
                    ) -> tuple[list[common.TestPair], dict[str, int]]:
  """The manifest's pairs of this subject whose photo is valid; skips counted by reason."""
  photos = _photos(root, group)
  by_image = {v.frame.image: v for v in views}
  pairs, skipped = [], {}
  for _, image, background, box in group.payload:
    view = by_image.get(f"{group.key}/{image or (photos[0] if photos else '')}")
    if view is None:
      continue  # the photo itself was skipped (and counted) while validating
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
      skipped["bad_box"] = skipped.get("bad_box", 0) + 1
      continue
    pairs.append(common.TestPair(view, background, box))
  return pairs, skipped
