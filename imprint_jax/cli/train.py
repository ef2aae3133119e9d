"""`imprint-jax train`, `encode-objects` and `encode-latents`: a run config's training, and the
stage-2 stores of frozen-encoder outputs that training can read instead."""

from __future__ import annotations

import argparse

import jax
from jax.experimental import multihost_utils

from imprint_jax.cli import distributed
from imprint_jax.data_prep import sources
from imprint_jax.train import encode_objects, loop, run_config


def run_train(args: argparse.Namespace) -> int:
  distributed.initialize(args)
  config = run_config.load(args.config, args.set)
  _prepare_sources(config, args.workdir)
  loop.train(config, args.workdir, resume=args.resume, takeover=args.takeover)
  return 0


def _prepare_sources(config, workdir) -> None:
  """The config's `synthetic:` data sources, generated and prepared in the run's workdir (the
  trainer only reads prepared folders): process 0 builds them, every process waits."""
  several = jax.process_count() > 1
  sources.prepare_sources(config, workdir, main_process=jax.process_index() == 0,
                          barrier=multihost_utils.sync_global_devices if several else None)


def _store_config(args: argparse.Namespace):
  """The run config of an `encode-*` command (after jax.distributed, when asked); its
  `synthetic:` sources prepared in --workdir, as `train` does."""
  distributed.initialize(args)
  config = run_config.load(args.config, args.set)
  if args.workdir:
    _prepare_sources(config, args.workdir)
  return config


def run_encode_objects(args: argparse.Namespace) -> int:
  config = _store_config(args)
  out = encode_objects.encode(config, args.out, variants=args.variants, batch=args.batch,
                              workdir=args.workdir)
  print(f"wrote {out}")
  return 0


def run_encode_latents(args: argparse.Namespace) -> int:
  config = _store_config(args)
  out = encode_objects.encode_latents(config, args.out, mask_draws=args.mask_draws,
                                      batch=args.batch, workdir=args.workdir)
  print(f"wrote {out}")
  return 0
