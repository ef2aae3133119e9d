"""What every reader shares: the frame/view/group records and pair sampling.

A reader is a module with

  NAME: str                       the `--source` name, also the record's `source`
  KIND: str                       the records' `kind` (schema.KINDS)
  LAYOUT: str                     the expected layout (its module docstring, for the README)
  resolve_root(root) -> Path      the folder the layout starts at; UserError if not found
  list_groups(root) -> (groups, skipped)   the split units (videos, objects, photo groups,
                                  images, subjects), sorted by key, cheap to compute
  group_frames(root, group) -> list[Frame] the annotated frames of one group (in a worker)
  make_pairs(views, cfg, rng) -> list[(object View, target View)]   (not for KIND "test")
  group_folder(root, group) -> Path | None the folder whose loss makes the group unreadable

Paths inside Frame are relative to the resolved root, so records name files portably.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from imprint_jax.data.crops import BadFile

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class Frame:
  """One annotated image.

  image: image path relative to the root.
  mask: mask path relative to the root; "" means the image's own alpha channel.
  index: position in its sequence (frame number), used by temporal windows.
  decode: how to read instances from the mask file:
    "binary"  one object, mask >= 128 (or nonzero for 0/1 masks);
    "index"   value = instance id (palette or grey PNG), 0 = background;
    "vipseg"  VIPSeg raw panomask: values >= 125 are thing instances (category*100 + k);
    "rgb"     COCO-panoptic RGB PNG, id = R + 256 G + 256^2 B;
    "alpha"   one object, the image's alpha >= 128.
  instances: ((instance key, mask value), ...) expected in this frame, or None to take
    every instance found in the mask ("index": all nonzero values; "vipseg": all things).
  """

  image: str
  mask: str
  index: int
  decode: str
  instances: tuple[tuple[str, int | None], ...] | None = None


@dataclasses.dataclass(frozen=True)
class View:
  """One instance in one frame that passed the filters."""

  frame: Frame
  instance: str
  value: int | None
  area: int = 0  # mask pixels in the full-resolution frame

  @property
  def ident(self) -> str:
    """'<image path>#<instance>': the record's object_id / target_id."""
    return f"{self.frame.image}#{self.instance}"


@dataclasses.dataclass(frozen=True)
class Group:
  """A unit of the train/val split: all pairs of one group stay in one split.

  key: stable name (video, 'category/object', photo group, image name, subject).
  payload: reader data gathered while listing (e.g. the video's meta.json entry).
  """

  key: str
  payload: Any = None


@dataclasses.dataclass(frozen=True)
class TestPair:
  """A DreamBooth-style test pair: a subject view composited into a background box."""

  view: View
  background: str
  box: tuple[int, int, int, int]


def list_dir(path: Path, *, dirs: bool | None = None) -> list[str]:
  """Sorted entry names of `path` (hidden ones dropped); dirs=True/False keeps only folders/
  files. Raises BadFile("unreadable_folder") if it cannot be listed."""
  try:
    with os.scandir(path) as it:
      entries = [e for e in it if not e.name.startswith(".")]
      if dirs is not None:
        entries = [e for e in entries if e.is_dir() == dirs]
      return sorted(e.name for e in entries)
  except OSError as e:  # missing, not a folder, permission denied
    raise BadFile("unreadable_folder", path) from e


def is_image(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def sample_pairs(views: list[View], n: int, rng: np.random.Generator,
                 window: int | None = None) -> list[tuple[View, View]]:
  """Up to `n` distinct ordered pairs (object view, target view) from different frames.

  Args:
    views: the valid views of one instance, in frame order.
    n: pairs wanted; n <= 0 takes every allowed pair.
    rng: the group's generator (so the choice is fixed by the seed and the group key).
    window: if set, only pairs with |index_i - index_j| <= window.

  Returns:
    The chosen pairs, in enumeration order (object frame, then target frame).
  """
  candidates = [(a, b) for a in views for b in views
                if a.frame.image != b.frame.image
                and (window is None or abs(a.frame.index - b.frame.index) <= window)]
  if n <= 0 or n >= len(candidates):
    return candidates
  chosen = np.sort(rng.choice(len(candidates), size=n, replace=False))
  return [candidates[i] for i in chosen]


def by_instance(views: list[View]) -> dict[str, list[View]]:
  """Views grouped by instance key, each list in frame order; keys in first-seen order."""
  out: dict[str, list[View]] = collections.defaultdict(list)
  for v in views:
    out[v.instance].append(v)
  return {k: sorted(vs, key=lambda v: (v.frame.index, v.frame.image)) for k, vs in out.items()}


def pairs_per_instance(views: list[View], cfg, rng: np.random.Generator,
                       window: int | None = None) -> list[tuple[View, View]]:
  """`sample_pairs` for every instance of a group (the video / multi-view recipe)."""
  pairs = []
  for _, vs in sorted(by_instance(views).items()):
    pairs.extend(sample_pairs(vs, cfg.pairs_per_instance, rng, window))
  return pairs
