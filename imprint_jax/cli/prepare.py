"""`imprint-jax prepare`: published dataset layouts -> pair shards (`imprint_jax.data_prep`)."""

from __future__ import annotations

import argparse

from imprint_jax.data_prep import prepare, synthetic
from imprint_jax.data_prep.config import SOURCES, PrepareConfig
from imprint_jax.data_prep.prepare import SPLITS
from imprint_jax.errors import UserError


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


def run(args: argparse.Namespace) -> int:
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
    summary = prepare.prepare(args.source, args.root, args.out, cfg, split=args.split,
                              workers=args.workers, overwrite=args.overwrite,
                              progress=not args.no_progress)
  except OSError as e:  # storage (full disk, quota, permissions) outside the shard writers
    raise UserError(f"prepare into {args.out} failed: {e}; finished work units are kept, a"
                    " rerun continues from them") from None
  print(prepare.format_summary(summary))
  return 0


