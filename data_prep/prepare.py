"""`imprint-jax prepare`: published dataset layouts -> pair shards (TFDS ArrayRecord).

  imprint-jax prepare --source youtube_vos --root /data/youtube-vos --out /data/pairs/ytvos \
      --workers 32 --seed 0

How a build runs (all of it is deterministic for a seed, whatever --workers is):

1. The reader lists the groups (videos, objects, photo groups, images, subjects) of --root.
   Groups are ordered by a hash of (seed, source, key); the first round(n * val_fraction)
   (at least one when val_fraction > 0 and n >= 2) form "val", the rest "train", so every
   pair of a group lands in one split (no leakage between frames of one video).
   DreamBooth (and --split test) puts every group in "test".
2. Phase 1, parallel over --workers processes: groups are cut into work units of
   --groups-per-shard groups. A unit validates every annotated frame (skips counted by
   reason), samples its pairs with the group's own random generator, crops and PNG-encodes
   them, and writes `<out>/.prepare/<split>/unit-NNNNN.ar` (temporary name, then renamed)
   followed by a `unit-NNNNN.json` done-marker holding its record count, byte size and skips.
   A unit counts as done only when its marker exists and the file size matches, so a rerun
   after an interruption redoes exactly the units that were not finished.
3. Phase 2: the units' records are concatenated in unit order, numbered (pair_id = index in
   the split) and dealt into --num-shards TFDS shards (0 = one per ~256 MiB), written under
   `.prepare/<split>/final/` and moved into <out> only when all are complete; then the TFDS
   metadata is (re)written for every split in <out>, `done.json` records the split's
   fingerprint and the unit files are deleted.
4. `<out>/prepare_summary.json` (also printed): pairs per split and source, and the skipped
   files/views by reason.

A rerun with the same settings skips finished splits and units. A rerun with different
settings (or a different dataset) into the same --out is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
from pathlib import Path
import pickle
import shutil
import sys
from typing import Any

import numpy as np

from imprint_jax.errors import UserError
from imprint_jax.data import crops
from imprint_jax.data_prep import shards
from imprint_jax.data import schema
from imprint_jax.data_prep.readers import READERS
from imprint_jax.data_prep.readers import common

SPLITS = ("train", "val", "test", "all")
PAIRINGS = ("views", "pairs")
INSTANCES = ("all", "largest")
SOURCES = tuple(READERS) + ("synthetic",)
SUMMARY_FILE = "prepare_summary.json"
_SHARD_BYTES = 256 * 2**20  # target size of one final shard when --num-shards is 0

# Test hook: called in the driver process after each finished work unit as (split, unit).
_AFTER_UNIT: Callable[[str, int], None] | None = None


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """Crop sizes, pair sampling and filters of a build (the CLI flags of the same names).

  encoder_size: E, object crop side in pixels.
  generator_size: G, target crop side in pixels.
  window: T, multi-view pairs only use views i, j with |i - j| <= T (frame positions).
  context: target crop side / the object box's longer side (clamped to the frame).
  min_area, max_area: allowed object mask area, as a fraction of the frame.
  min_size: minimum object box side in source pixels.
  min_connected: minimum share of the mask held by its largest connected component.
  val_fraction: share of groups (videos/objects/...) held out as the "val" split.
  pairs_per_instance: pairs sampled per object instance (<= 0: every allowed pair); for
    multi-view sources only with pairing "pairs".
  pairing: multi-view sources (mvimgnet): "views" keeps every valid view of an object (kind
    "view" records + `views-<split>.json`) and the training pipeline draws a fresh pair
    |i - j| <= data.window every time it visits the object, as the paper samples pairs during
    training; "pairs" fixes up to pairs_per_instance pairs |i - j| <= window here. Other
    sources always fix their pairs.
  instances: image sources (images): "all" makes a record of every valid instance of an
    image; "largest" only of its largest valid instance (most mask pixels; ties: the first
    in instance order), the paper's Pixabay test protocol ("a foreground object is selected
    from each image").
  groups_per_shard: groups per phase-1 work unit (the resume granularity).
  num_shards: final shards per split; 0 picks one per ~256 MiB.
  seed: fixes the split, the pair sampling and hence every output byte.
  """

  encoder_size: int = 224
  generator_size: int = 512
  window: int = 7
  context: float = 2.0
  min_area: float = 0.01
  max_area: float = 0.9
  min_size: int = 48
  min_connected: float = 0.8
  val_fraction: float = 0.02
  pairs_per_instance: int = 6
  pairing: str = "views"
  instances: str = "all"
  groups_per_shard: int = 64
  num_shards: int = 0
  seed: int = 0

  def validate(self) -> "PrepareConfig":
    """Returns self; raises UserError naming the first bad value."""
    checks = [
        (self.encoder_size >= 8, "--encoder-size must be >= 8"),
        (self.generator_size >= 8, "--generator-size must be >= 8"),
        (self.window >= 1, "--window must be >= 1"),
        (self.context >= 1.0, "--context must be >= 1.0"),
        (0.0 <= self.min_area <= self.max_area <= 1.0,
         "--min-area and --max-area must satisfy 0 <= min <= max <= 1"),
        (self.min_size >= 1, "--min-size must be >= 1"),
        (0.0 <= self.min_connected <= 1.0, "--min-connected must be in [0, 1]"),
        (0.0 <= self.val_fraction < 1.0, "--val-fraction must be in [0, 1)"),
        (self.pairing in PAIRINGS, f"--pairing must be one of {', '.join(PAIRINGS)}"),
        (self.instances in INSTANCES, f"--instances must be one of {', '.join(INSTANCES)}"),
        (self.groups_per_shard >= 1, "--groups-per-shard must be >= 1"),
        (self.num_shards >= 0, "--num-shards must be >= 0"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"{message} (got {self})")
    return self


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `prepare` flags to `parser` (defaults from PrepareConfig)."""
  d = PrepareConfig()
  parser.add_argument("--source", required=True,
                      help=f"dataset layout to read: {', '.join(SOURCES)} (synthetic writes "
                           "small datasets in every layout into --out)")
  parser.add_argument("--root", help="dataset folder in the source's published layout")
  parser.add_argument("--out", required=True, help="output folder of the prepared dataset")
  parser.add_argument("--split", default="all",
                      help="train, val, test or all (train + val; test for dreambooth)")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="parallel worker processes (the output does not depend on it)")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild the split(s) from scratch, discarding earlier output")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  g = parser.add_argument_group("crops and filters")
  g.add_argument("--encoder-size", type=int, default=d.encoder_size, help="object crop side E")
  g.add_argument("--generator-size", type=int, default=d.generator_size,
                 help="target crop side G")
  g.add_argument("--pairing", choices=PAIRINGS, default=d.pairing,
                 help="multi-view sources: 'views' keeps every valid view and training draws"
                      " a fresh pair per visit (the paper samples pairs during training);"
                      " 'pairs' fixes --pairs-per-instance pairs now (default: %(default)s)")
  g.add_argument("--instances", choices=INSTANCES, default=d.instances,
                 help="images source: a record per valid instance ('all', default) or only"
                      " of each image's largest one ('largest': the paper's Pixabay test set,"
                      " one object per image)")
  g.add_argument("--window", type=int, default=d.window,
                 help="multi-view window k, |i - j| <= k, for --pairing pairs (with views,"
                      " training's data.window applies). Default %(default)s: our choice,"
                      " the paper's value is lost (docs/paper_fidelity.md)")
  g.add_argument("--context", type=float, default=d.context,
                 help="target crop side / object box side (default %(default)s: our choice,"
                      " the paper states none)")
  g.add_argument("--min-area", type=float, default=d.min_area,
                 help="minimum mask area fraction of the frame (default %(default)s: ours)")
  g.add_argument("--max-area", type=float, default=d.max_area,
                 help="maximum mask area fraction of the frame (default %(default)s: ours)")
  g.add_argument("--min-size", type=int, default=d.min_size,
                 help="minimum object box side in pixels (default %(default)s: ours)")
  g.add_argument("--min-connected", type=float, default=d.min_connected,
                 help="minimum share of the mask in its largest connected component"
                      " (default %(default)s: ours)")
  g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                 help="share of groups (videos, objects, ...) held out for val (default"
                      " %(default)s: ours; the paper's splits are 0.8%% and 7%%)")
  g.add_argument("--pairs-per-instance", type=int, default=d.pairs_per_instance,
                 help="pairs sampled per object instance (<= 0: all). Default %(default)s:"
                      " the paper's 1,409,545 MVImgNet pairs over ~219k objects")
  g.add_argument("--groups-per-shard", type=int, default=d.groups_per_shard,
                 help="groups per work unit (resume granularity)")
  g.add_argument("--num-shards", type=int, default=d.num_shards,
                 help="final shards per split (0: one per ~256 MiB)")
  s = parser.add_argument_group("synthetic")
  s.add_argument("--synthetic-groups", type=int, default=3,
                 help="videos/objects/groups/images/subjects per synthetic layout")
  s.add_argument("--synthetic-frame-size", type=int, default=128,
                 help="frame height in pixels of synthetic datasets")


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
  """The PrepareConfig of parsed `prepare` flags."""
  return PrepareConfig(
      encoder_size=args.encoder_size, generator_size=args.generator_size, window=args.window,
      context=args.context, min_area=args.min_area, max_area=args.max_area,
      min_size=args.min_size, min_connected=args.min_connected,
      val_fraction=args.val_fraction, pairs_per_instance=args.pairs_per_instance,
      pairing=args.pairing, instances=args.instances,
      groups_per_shard=args.groups_per_shard, num_shards=args.num_shards,
      seed=args.seed).validate()


def main(args: argparse.Namespace) -> int:
  """Runs `prepare` for parsed flags; prints the summary. Raises UserError on bad input."""
  if args.source not in SOURCES:
    raise UserError(f"--source {args.source!r} is unknown: choose one of {', '.join(SOURCES)}")
  if args.split not in SPLITS:
    raise UserError(f"--split {args.split!r} is unknown: choose one of {', '.join(SPLITS)}")
  if args.workers < 1:
    raise UserError(f"--workers must be >= 1 (got {args.workers})")
  cfg = config_from_args(args)
  if args.source == "synthetic":
    from imprint_jax.data_prep import synthetic
    scfg = synthetic.SyntheticConfig(groups=args.synthetic_groups,
                                     frame_size=args.synthetic_frame_size, seed=args.seed)
    roots = synthetic.generate(args.out, scfg)
    print(f"synthetic datasets written to {args.out}; prepare them with e.g.")
    for name, root in roots.items():
      print(f"  imprint-jax prepare --source {name} --root {root} --out <pairs>/{name}")
    return 0
  if not args.root:
    raise UserError(f"--root is required for --source {args.source}")
  try:
    summary = prepare(args.source, args.root, args.out, cfg, split=args.split,
                      workers=args.workers, overwrite=args.overwrite,
                      progress=not args.no_progress)
  except OSError as e:  # storage (full disk, quota, permissions) outside the shard writers
    raise UserError(f"prepare into {args.out} failed: {e}; finished work units are kept, a"
                    " rerun continues from them") from None
  print(format_summary(summary))
  return 0


def prepare(source: str, root, out, cfg: PrepareConfig = PrepareConfig(), *,
            split: str = "all", workers: int = 1, overwrite: bool = False,
            progress: bool = True) -> dict[str, Any]:
  """Builds the pair shards of one source; returns the summary (also written as JSON).

  Args:
    source: a reader name (`READERS`).
    root: dataset folder in that reader's layout.
    out: output folder (a TFDS dataset folder once done).
    cfg: crop sizes, filters, sampling and seed.
    split: "train", "val", "test" (every group) or "all" (train + val; test for dreambooth).
    workers: worker processes; 1 runs everything in this process.
    overwrite: discard earlier output of these splits instead of refusing a changed build.
    progress: show tqdm bars on stderr.
  """
  if source not in READERS:
    raise UserError(f"--source {source!r} is unknown: choose one of {', '.join(READERS)}")
  if split not in SPLITS:
    raise UserError(f"--split {split!r} is unknown: choose one of {', '.join(SPLITS)}")
  cfg.validate()
  reader = READERS[source]
  root = Path(root)
  if not root.is_dir():
    raise UserError(f"--root {root} does not exist or is not a folder")
  root = reader.resolve_root(root)
  out = Path(out)
  groups, scan_skipped = reader.list_groups(root)
  if not groups:
    raise UserError(f"--root {root}: no {source} groups (videos/objects/images) found")
  plan = assign_splits(source, groups, cfg, split)
  out.mkdir(parents=True, exist_ok=True)
  for other in sorted((out / shards.WORK_DIR).glob("*/done.json")):
    other_cfg = (_read_json(other) or {}).get("fingerprint", {}).get("config", {})
    sizes = (other_cfg.get("encoder_size"), other_cfg.get("generator_size"))
    if other.parent.name not in plan and sizes != (cfg.encoder_size, cfg.generator_size):
      raise UserError(f"{out} holds split {other.parent.name!r} with sizes E, G = {sizes}; one "
                      "dataset folder has one feature spec: use the same --encoder-size and "
                      "--generator-size, or another --out")
  with _Runner(workers, progress) as runner:
    for name, split_groups in plan.items():
      _build_split(reader, root, out, name, split_groups, cfg, runner, overwrite=overwrite)
  return _write_summary(out, source, root, cfg, scan_skipped)


def _hash(*parts) -> int:
  digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8)
  return int.from_bytes(digest.digest(), "little")


def assign_splits(source: str, groups: list[common.Group], cfg: PrepareConfig,
                  split: str = "all") -> dict[str, list[common.Group]]:
  """Which groups go to which split, each list in build order (hash order for the seed).

  Returns {split name: groups}; splits without groups are left out.
  """
  order = sorted(groups, key=lambda g: (_hash(cfg.seed, source, g.key), g.key))
  if READERS[source].KIND == "test" or split == "test":
    if split in ("train", "val"):
      raise UserError(f"--source {source} makes test pairs only: use --split test (or all)")
    return {"test": order} if order else {}
  n = len(order)
  n_val = int(round(n * cfg.val_fraction))
  if cfg.val_fraction > 0 and n >= 2:
    n_val = min(max(n_val, 1), n - 1)
  plan = {"train": order[n_val:], "val": order[:n_val]}
  wanted = ("train", "val") if split == "all" else (split,)
  return {k: v for k, v in plan.items() if k in wanted and v}


# ---------------------------------------------------------------------------------------
# Phase 1: groups -> unit files of encoded records (runs in worker processes).


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
  rng = np.random.default_rng(_hash(cfg.seed, reader.NAME, group.key))
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


def _unit_paths(work: Path, index: int) -> tuple[Path, Path]:
  return work / f"unit-{index:05d}.ar", work / f"unit-{index:05d}.json"


def _write_json(path: Path, data: Any) -> None:
  """Writes JSON atomically (temporary file + rename)."""
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  try:
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise UserError(f"{path}: writing failed ({e.strerror or e}); the partial file was"
                    " removed") from None


def _read_json(path: Path) -> Any | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _unit_done(work: Path, index: int) -> dict | None:
  """The unit's marker if the unit is complete (marker present, file size matching)."""
  data_path, marker_path = _unit_paths(work, index)
  marker = _read_json(marker_path)
  if marker is None or not data_path.exists() or data_path.stat().st_size != marker["bytes"]:
    return None
  return marker


def _unit_job(job: dict[str, Any]) -> dict[str, Any]:
  """Phase-1 work unit (module level so worker processes can run it)."""
  reader = READERS[job["source"]]
  cfg = PrepareConfig(**job["cfg"])
  root, work = Path(job["root"]), Path(job["work"])
  skipped: Counter = Counter()
  view_groups: list = []

  def payloads():
    for group in job["groups"]:
      for record in group_records(reader, root, group, cfg, skipped, view_groups):
        yield pickle.dumps(record, protocol=5)

  data_path, marker_path = _unit_paths(work, job["index"])
  count, size = shards.write_array_record(data_path, payloads(), tmp_dir=work)
  marker = {"unit": job["index"], "groups": len(job["groups"]), "records": count,
            "bytes": size, "skipped": dict(sorted(skipped.items()))}
  if uses_views(reader, cfg):
    marker["views"] = view_groups
  _write_json(marker_path, marker)
  return marker


# ---------------------------------------------------------------------------------------
# Phase 2: unit files -> numbered TFDS shards.


def _shard_job(job: dict[str, Any]) -> int:
  from array_record.python.array_record_module import ArrayRecordReader
  from imprint_jax.data import schema
  features = schema.features(job["encoder_size"], job["generator_size"])

  def payloads():
    pair_id = job["first_pair_id"]
    for path, start, stop in job["segments"]:
      reader = ArrayRecordReader(path)
      try:
        raws = reader.read(start, stop)
      finally:
        reader.close()
      for raw in raws:
        record = pickle.loads(raw)
        record["pair_id"] = pair_id
        pair_id += 1
        yield shards.serialize(record, features)

  count, _ = shards.write_array_record(Path(job["path"]), payloads(), tmp_dir=job["tmp"])
  return count


class _Runner:
  """Runs jobs in this process (workers=1) or in one spawn pool shared by all phases."""

  def __init__(self, workers: int, progress: bool):
    self.workers, self.progress = workers, progress
    self.pool: concurrent.futures.ProcessPoolExecutor | None = None

  def __enter__(self) -> "_Runner":
    return self

  def __exit__(self, exc_type, *_) -> None:
    if self.pool is not None:
      self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)

  def run(self, fn, jobs: list, desc: str,
          after: Callable[[Any, Any], None] | None = None) -> None:
    """Runs fn(job) for every job with a tqdm bar on stderr; after(job, result) in order of
    completion."""
    from imprint_jax.progress import bar as progress_bar
    bar = progress_bar(total=len(jobs), desc=desc, file=sys.stderr, disable=not self.progress,
               unit="unit", dynamic_ncols=True)
    try:
      if self.workers <= 1 or len(jobs) <= 1:
        for job in jobs:
          result = fn(job)
          bar.update()
          if after:
            after(job, result)
        return
      if self.pool is None:
        # spawn, not fork: the driver may hold threads (tfds, absl) that fork copies broken.
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"))
      futures = {self.pool.submit(fn, job): job for job in jobs}
      try:
        for future in concurrent.futures.as_completed(futures):
          result = future.result()
          bar.update()
          if after:
            after(futures[future], result)
      except BaseException:
        for future in futures:
          future.cancel()
        raise
    finally:
      bar.close()


def _fingerprint(reader, root: Path, split: str, groups: list[common.Group],
                 cfg: PrepareConfig) -> dict[str, Any]:
  keys = hashlib.sha256("\n".join(g.key for g in groups).encode()).hexdigest()
  return {"source": reader.NAME, "root": os.fspath(root.resolve()), "split": split,
          "config": dataclasses.asdict(cfg), "groups": len(groups), "group_keys": keys}


def _build_split(reader, root: Path, out: Path, split: str, groups: list[common.Group],
                 cfg: PrepareConfig, runner: _Runner, *, overwrite: bool) -> dict:
  work = out / shards.WORK_DIR / split
  fingerprint = _fingerprint(reader, root, split, groups, cfg)
  view_index = out / schema.VIEW_INDEX.format(split=split)
  if overwrite:
    shutil.rmtree(work, ignore_errors=True)
    for f in shards.split_shard_files(out, split):
      f.unlink()
    view_index.unlink(missing_ok=True)
  done = _read_json(work / "done.json")
  if done is not None:
    if done["fingerprint"] != fingerprint:
      raise UserError(f"{out} already holds split {split!r} built with other settings or data; "
                      "pass --overwrite to rebuild it, or use another --out")
    if len(shards.split_shard_files(out, split)) == done["summary"]["shards"]:
      return done["summary"]  # finished earlier: nothing to do
  state = _read_json(work / "state.json")
  if state is not None and state["fingerprint"] != fingerprint:
    raise UserError(f"{out} holds an unfinished build of split {split!r} with other settings or "
                    "data; pass --overwrite to start over, or use another --out")
  if state is None and shards.split_shard_files(out, split):
    raise UserError(f"{out} already holds shards of split {split!r} not made by this build; "
                    "pass --overwrite to replace them, or use another --out")
  work.mkdir(parents=True, exist_ok=True)
  _write_json(work / "state.json", {"fingerprint": fingerprint})

  # Phase 1.
  units = [groups[i:i + cfg.groups_per_shard] for i in range(0, len(groups),
                                                               cfg.groups_per_shard)]
  base = {"source": reader.NAME, "root": os.fspath(root), "work": os.fspath(work),
          "cfg": dataclasses.asdict(cfg)}
  jobs = [dict(base, index=i, groups=u) for i, u in enumerate(units) if not _unit_done(work, i)]

  def after_unit(job, _):
    if _AFTER_UNIT is not None:
      _AFTER_UNIT(split, job["index"])

  runner.run(_unit_job, jobs, f"{reader.NAME}/{split} units", after_unit)
  markers = [_unit_done(work, i) for i in range(len(units))]
  if any(m is None for m in markers):
    raise RuntimeError(f"work units of {split} incomplete after phase 1: {work}")

  # Phase 2.
  lengths = [m["records"] for m in markers]
  total = sum(lengths)
  num_shards = cfg.num_shards or max(1, math.ceil(sum(m["bytes"] for m in markers)
                                                  / _SHARD_BYTES))
  if total == 0:
    num_shards = 0  # TFDS cannot read a split without examples: publish none
  final = work / "final"
  final.mkdir(exist_ok=True)
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
  shard_jobs = []
  for k in range(num_shards):
    lo, hi = k * total // num_shards, (k + 1) * total // num_shards
    path = final / shards.shard_name(split, k, num_shards)
    if path.exists():
      continue  # complete: shards only appear under their name once written
    segments = []
    for u in range(len(units)):
      a, b = max(lo, starts[u]), min(hi, starts[u + 1])
      if a < b:
        segments.append((os.fspath(_unit_paths(work, u)[0]), int(a - starts[u]),
                         int(b - starts[u])))
    shard_jobs.append({"path": os.fspath(path), "tmp": os.fspath(work), "segments": segments,
                       "first_pair_id": lo, "encoder_size": cfg.encoder_size,
                       "generator_size": cfg.generator_size})
  for stale in final.iterdir():
    if not stale.name.endswith(f"-of-{num_shards:05d}"):
      stale.unlink()
  runner.run(_shard_job, shard_jobs, f"{reader.NAME}/{split} shards")

  # Publish: the split's shards appear in <out> together, then metadata, then done.json.
  for old in shards.split_shard_files(out, split):
    old.unlink()
  view_index.unlink(missing_ok=True)
  if uses_views(reader, cfg):
    # Records are numbered in unit order, each unit's instances in order, views in frame order.
    groups_index, frame_index, start = [], [], 0
    for m in markers:
      for n, frames in m["views"]:
        groups_index.append([start, n])
        frame_index.extend(frames)
        start += n
    if start != total:
      raise RuntimeError(f"view index of {split} covers {start} records, the split has {total}")
    tmp = view_index.with_name(view_index.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"groups": groups_index, "frame_index": frame_index},
                              separators=(",", ":")) + "\n")
    os.replace(tmp, view_index)
  for k in range(num_shards):
    name = shards.shard_name(split, k, num_shards)
    os.replace(final / name, out / name)
  if any(shards.shard_re().match(p.name) for p in out.iterdir()):
    shards.write_metadata(out, encoder_size=cfg.encoder_size,
                          generator_size=cfg.generator_size)
  skipped: Counter = Counter()
  for m in markers:
    skipped.update(m["skipped"])
  summary = {"pairs": total, "groups": len(groups), "shards": num_shards,
             "skipped": dict(sorted(skipped.items()))}
  _write_json(work / "done.json", {"fingerprint": fingerprint, "summary": summary})
  for i in range(len(units)):
    for p in _unit_paths(work, i):
      p.unlink(missing_ok=True)
  shutil.rmtree(final, ignore_errors=True)
  return summary


def _write_summary(out: Path, source: str, root: Path, cfg: PrepareConfig,
                   scan_skipped: dict[str, int]) -> dict[str, Any]:
  """Summary of every finished split in `out` (this run's and earlier ones)."""
  splits = {}
  work = out / shards.WORK_DIR
  if work.is_dir():
    for d in sorted(work.iterdir()):
      done = _read_json(d / "done.json")
      if done is not None:
        splits[d.name] = dict(done["summary"], source=done["fingerprint"]["source"])
  skipped: Counter = Counter(scan_skipped)
  pairs: Counter = Counter()
  for s in splits.values():
    skipped.update(s["skipped"])
    pairs[s["source"]] += s["pairs"]
  summary = {"source": source, "root": os.fspath(root), "out": os.fspath(out),
             "config": dataclasses.asdict(cfg), "splits": splits,
             "pairs_written": dict(sorted(pairs.items())),
             "skipped": dict(sorted(skipped.items()))}
  _write_json(out / SUMMARY_FILE, summary)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """A few human-readable lines of a `prepare` summary."""
  parts = [f"{name} {s['pairs']} pairs ({s['groups']} groups, {s['shards']} shards)"
           for name, s in summary["splits"].items()]
  skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
  return (f"prepare {summary['source']}: {'; '.join(parts) or 'no pairs'}\n"
          f"skipped: {skipped}\n"
          f"summary: {Path(summary['out']) / SUMMARY_FILE}")
