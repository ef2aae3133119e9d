"""Phase 1 of a build, one group at a time: frames -> valid object views -> pair records.

Runs in `prepare`'s worker processes (`build.unit_job`). Every file problem and filter
rejection is counted by reason, never raised: a build skips what it cannot use and reports it.
"""

from __future__ import annotations

from collections import Counter
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from imprint_jax.data import crops
from imprint_jax.data_prep import shards
from imprint_jax.data_prep.config import PrepareConfig
from imprint_jax.data_prep.readers import common


def group_hash(*parts) -> int:
  digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8)
  return int.from_bytes(digest.digest(), "little")


class _Loader:
  """Decodes frames and instance masks of one group, keeping the last few."""

  def __init__(self, root: Path):
    self.root = root
    self.cache = crops.LRU(6)

  def image(self, rel: str, keep_alpha: bool = False) -> np.ndarray:
    return self.cache.get(("image", rel, keep_alpha),
                          lambda: crops.load_image(self.root / rel, keep_alpha=keep_alpha))

  def view(self, view: common.View) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 frame and (H, W) bool mask of one view."""
    frame = view.frame
    if frame.decode == "alpha":
      rgba = self.image(frame.image, keep_alpha=True)
      return rgba[..., :3], crops.alpha_mask(rgba)
    image = self.image(frame.image)
    values = self.cache.get(("mask", frame.mask), lambda: crops.load_mask_values(
        self.root / frame.mask, rgb_ids=frame.decode == "rgb"))
    if values.shape != image.shape[:2]:
      raise crops.BadFile("mask_size_mismatch", self.root / frame.mask)
    return image, _instance_mask(frame.decode, values, view.value)


def _instance_mask(decode: str, values: np.ndarray, value: int | None) -> np.ndarray:
  if decode == "binary":
    return crops.binary_mask(values)
  return values == value


def _frame_instances(frame: common.Frame, values: np.ndarray
                     ) -> list[tuple[str, int | None, np.ndarray]]:
  if frame.decode == "binary":
    key = frame.instances[0][0] if frame.instances else "object"
    return [(key, None, crops.binary_mask(values))]
  if frame.instances is not None:
    return [(key, value, values == value) for key, value in frame.instances]
  found = np.unique(values)
  found = found[found >= 125] if frame.decode == "vipseg" else found[found != 0]
  return [(str(int(v)), int(v), values == v) for v in found]


def validate_frames(root: Path, frames: list[common.Frame], cfg: PrepareConfig,
                    skipped: Counter, *, apply_filters: bool = True) -> list[common.View]:
  """The instances of `frames` that pass the checks and filters; the rest counted by reason.

  File problems (corrupt/missing image or mask, mask size != image size) are counted once
  per file; filter rejections once per instance view.
  """
  views = []
  checked: dict[str, tuple[int, int] | None] = {}  # several frames may share one image
  for frame in frames:
    if frame.image not in checked:
      try:
        checked[frame.image] = crops.check_image(root / frame.image)
      except crops.BadFile as e:
        skipped[e.reason] += 1
        checked[frame.image] = None
    if checked[frame.image] is None:
      continue
    width, height = checked[frame.image]
    try:
      if frame.decode == "alpha":
        if not crops.has_alpha(root / frame.image):
          raise crops.BadFile("missing_mask", root / frame.image)
        rgba = crops.load_image(root / frame.image, keep_alpha=True)
        instances = [(frame.instances[0][0], None, crops.alpha_mask(rgba))]
      else:
        values = crops.load_mask_values(root / frame.mask, rgb_ids=frame.decode == "rgb")
        if values.shape != (height, width):
          raise crops.BadFile("mask_size_mismatch", root / frame.mask)
        instances = _frame_instances(frame, values)
    except crops.BadFile as e:
      skipped[e.reason] += 1
      continue
    if not instances and frame.decode == "index":
      skipped["empty_mask"] += 1  # an instance-mask file that holds no instance at all
    for key, value, mask in instances:
      if apply_filters:
        reason = crops.filter_reason(mask, min_area=cfg.min_area, max_area=cfg.max_area,
                                     min_size=cfg.min_size, min_connected=cfg.min_connected)
      else:
        reason = None if mask.any() else "empty_mask"
      if reason:
        skipped[reason] += 1
      else:
        views.append(common.View(frame, key, value, int(np.count_nonzero(mask))))
  return views


def _record(source: str, kind: str, obj: tuple, tgt: tuple, object_id: str,
            target_id: str) -> dict[str, Any]:
  (o, om), (t, tm, box) = obj, tgt
  return {"object": shards.encode_png(o), "object_mask": shards.encode_png(om),
          "target": shards.encode_png(t), "target_mask": shards.encode_png(tm),
          "box": [float(x) for x in box], "source": source, "kind": kind,
          "object_id": object_id, "target_id": target_id}


def uses_views(reader, cfg: PrepareConfig) -> bool:
  """Whether the build keeps views (kind "view" + view index) instead of fixed pairs."""
  return reader.KIND == "multiview" and cfg.pairing == "views"


def group_records(reader, root: Path, group: common.Group, cfg: PrepareConfig,
                  skipped: Counter, view_groups: list | None = None):
  """Yields the encoded records (no pair_id yet) of one group; skips go to `skipped`.

  View builds (`uses_views`) yield one record per valid view of every instance with at least
  two, and append [number of records, [frame positions]] per instance to `view_groups`."""
  E, G = cfg.encoder_size, cfg.generator_size
  rng = np.random.default_rng(group_hash(cfg.seed, reader.NAME, group.key))
  try:
    frames = reader.group_frames(root, group)
  except crops.BadFile as e:
    skipped[e.reason] += 1
    return
  test = reader.KIND == "test"
  views = validate_frames(root, frames, cfg, skipped, apply_filters=not test)
  loader = _Loader(root)
  counted: set[str] = set()

  def count(e: crops.BadFile) -> None:
    if not e.path or e.path not in counted:
      skipped[e.reason] += 1
      counted.add(e.path)

  if test:
    pairs, extra = reader.make_test_pairs(root, group, views)
    skipped.update(extra)
    for pair in pairs:
      try:
        width, height = crops.check_image(root / pair.background)
        x0, y0, x1, y1 = pair.box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
          skipped["bad_box"] += 1
          continue
        background = loader.image(pair.background)
        image, mask = loader.view(pair.view)
        obj = crops.object_crop(image, mask, E)
        tgt = crops.box_target_crop(background, pair.box, G, cfg.context)
      except crops.BadFile as e:
        count(e)
        continue
      yield _record(reader.NAME, reader.KIND, obj, tgt, pair.view.ident,
                    f"{pair.background}#{x0},{y0},{x1},{y1}")
    return

  if uses_views(reader, cfg):
    for _, instance_views in sorted(common.by_instance(views).items()):
      if len({v.frame.image for v in instance_views}) < 2:
        skipped["instance_without_pair"] += 1
        continue
      written = []
      for v in instance_views:
        try:
          image, mask = loader.view(v)
          obj = crops.object_crop(image, mask, E)
          tgt = crops.target_crop(image, mask, G, cfg.context)
        except crops.BadFile as e:
          count(e)
          continue
        written.append(v.frame.index)
        yield _record(reader.NAME, "view", obj, tgt, v.ident, v.ident)
      if view_groups is not None and written:
        view_groups.append([len(written), written])
    return

  if reader.KIND == "image" and cfg.instances == "largest" and views:
    if len(views) > 1:
      skipped["not_largest_instance"] += len(views) - 1
    views = [max(views, key=lambda v: v.area)]  # max keeps the first of equal areas
  pairs = reader.make_pairs(views, cfg, rng)
  paired = {a.instance for a, _ in pairs}
  lonely = {v.instance for v in views} - paired
  if lonely:
    skipped["instance_without_pair"] += len(lonely)
  for a, b in pairs:
    try:
      image, mask = loader.view(a)
      obj = crops.object_crop(image, mask, E)
      image, mask = loader.view(b)
      tgt = crops.target_crop(image, mask, G, cfg.context)
    except crops.BadFile as e:
      count(e)
      continue
    yield _record(reader.NAME, reader.KIND, obj, tgt, a.ident, b.ident)
