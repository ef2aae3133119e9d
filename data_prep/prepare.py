"""`imprint-jax prepare`: published dataset layouts -> pair shards (TFDS ArrayRecord).

  imprint-jax prepare --source youtube_vos --root /data/youtube-vos --out /data/pairs/ytvos \
      --workers 32 --seed 0

How a build runs (all of it is deterministic for a seed, whatever --workers is):

1. The reader lists the groups (videos, objects, photo groups, images, subjects) of --root.
   Groups are ordered by a hash of (seed, source, key); the first round(n * val_fraction)
   (at least one when val_fraction > 0 and n >= 2) form "val", the rest "train", so every
   pair of a group lands in one split (no leakage between frames of one video).
   DreamBooth (and --split test) puts every group in "test". (`assign_splits`, here.)
2. Phase 1 (`build`, `pairs`), parallel over --workers processes: groups are cut into work units of
   --groups-per-shard groups. A unit validates every annotated frame (skips counted by
   reason), samples its pairs with the group's own random generator, crops and PNG-encodes
   them, and writes `<out>/.prepare/<split>/unit-NNNNN.ar` (temporary name, then renamed)
   followed by a `unit-NNNNN.json` done-marker holding its record count, byte size and skips.
   A unit counts as done only when its marker exists and the file size matches, so a rerun
   after an interruption redoes exactly the units that were not finished.
3. Phase 2 (`build`): the units' records are concatenated in unit order, numbered (pair_id =
   index in the split) and dealt into --num-shards TFDS shards (0 = one per ~256 MiB), written
   under `.prepare/<split>/final/` and moved into <out> only when all are complete; then the TFDS
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
import dataclasses
import os
from pathlib import Path
from typing import Any

from imprint_jax.data_prep import build, pairs, shards, synthetic
from imprint_jax.data_prep.config import INSTANCES, PAIRINGS, PrepareConfig
from imprint_jax.data_prep.readers import READERS
from imprint_jax.data_prep.readers import common
from imprint_jax.errors import UserError

SPLITS = ("train", "val", "test", "all")
SOURCES = tuple(READERS) + ("synthetic",)
SUMMARY_FILE = "prepare_summary.json"


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
    other_cfg = (build.read_json(other) or {}).get("fingerprint", {}).get("config", {})
    sizes = (other_cfg.get("encoder_size"), other_cfg.get("generator_size"))
    if other.parent.name not in plan and sizes != (cfg.encoder_size, cfg.generator_size):
      raise UserError(f"{out} holds split {other.parent.name!r} with sizes E, G = {sizes}; one "
                      "dataset folder has one feature spec: use the same --encoder-size and "
                      "--generator-size, or another --out")
  with build.Runner(workers, progress) as runner:
    for name, split_groups in plan.items():
      build.build_split(reader, root, out, name, split_groups, cfg, runner, overwrite=overwrite)
  return _write_summary(out, source, root, cfg, scan_skipped)


def assign_splits(source: str, groups: list[common.Group], cfg: PrepareConfig,
                  split: str = "all") -> dict[str, list[common.Group]]:
  """Which groups go to which split, each list in build order (hash order for the seed).

  Returns {split name: groups}; splits without groups are left out.
  """
  order = sorted(groups, key=lambda g: (pairs.group_hash(cfg.seed, source, g.key), g.key))
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


def _write_summary(out: Path, source: str, root: Path, cfg: PrepareConfig,
                   scan_skipped: dict[str, int]) -> dict[str, Any]:
  """Summary of every finished split in `out` (this run's and earlier ones)."""
  splits = {}
  work = out / shards.WORK_DIR
  if work.is_dir():
    for d in sorted(work.iterdir()):
      done = build.read_json(d / "done.json")
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
  build.write_json(out / SUMMARY_FILE, summary)
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """A few human-readable lines of a `prepare` summary."""
  parts = [f"{name} {s['pairs']} pairs ({s['groups']} groups, {s['shards']} shards)"
           for name, s in summary["splits"].items()]
  skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
  return (f"prepare {summary['source']}: {'; '.join(parts) or 'no pairs'}\n"
          f"skipped: {skipped}\n"
          f"summary: {Path(summary['out']) / SUMMARY_FILE}")
