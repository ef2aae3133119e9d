"""Flags of `imprint-jax prepare` (runner: `cli/prepare.py`)."""

from __future__ import annotations

import argparse
import os

from imprint_jax import cli
from imprint_jax.data_prep.config import INSTANCES, PAIRINGS, SOURCES, PrepareConfig


def add_parser(sub) -> None:
  p = sub.add_parser("prepare", help=cli.help_line("prepare"),
                     description="`imprint-jax prepare`: published dataset layouts -> pair shards"
                     " (TFDS ArrayRecord).")
  add_arguments(p)
  p.set_defaults(func=cli.runner("prepare", "run"))


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
