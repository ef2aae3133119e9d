"""`imprint-jax evaluate`: the paper's benchmark (`imprint_jax.evaluation.runner`) or the
multi-view encoder test (`imprint_jax.evaluation.multiview`) from parsed flags.

On several hosts (the shared --distributed/--coordinator flags) each host scores its share of
the pairs (`distributed.host_share`, the split `composite --manifest` uses) and host 0 merges
the shares into the one report a single host writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

import jax

from imprint_jax.cli import distributed
from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.convert.common import AtomicDir
from imprint_jax.errors import UserError
from imprint_jax.evaluation import baselines, metrics, multiview, runner
from imprint_jax.evaluation.methods import GenerateFn, folder_generator, model_generator
from imprint_jax.evaluation.report import markdown


def run(args: argparse.Namespace) -> int:
  """Runs `evaluate`; prints the table. UserError for bad input."""
  if args.testset == "multiview":
    return run_multiview(args)
  if not args.ckpt and not args.images and not args.baseline:
    raise UserError("give --ckpt (run the model), --baseline NAME and/or --images DIR (score"
                    " another method's composites)")
  if bool(args.baseline) != bool(args.baseline_weights):
    raise UserError("--baseline and --baseline-weights go together")
  distributed.initialize(args)  # before anything starts JAX's backend
  settings = {"ckpt": None, "images": args.images, "steps": args.steps,
              "guidance": args.guidance}
  if args.baseline:
    settings.update(baseline=args.baseline, baseline_weights=args.baseline_weights)
  # The test set is checked before anything loads.
  run_ = runner.plan(args.root, args.testset, split=args.split, limit=args.limit,
                     batch_size=args.batch_size, mask_level=args.mask_level, seed=args.seed,
                     all_instances=args.all_instances, settings=settings)
  methods: dict[str, GenerateFn] = {}
  if args.images:
    name = args.name or Path(args.images).resolve().name
    methods[name] = folder_generator(args.images)
  suite = metrics.load_suite(clip=args.clip, dino=args.dino, inception=args.inception,
                             dreamsim_dir=args.dreamsim_dir, fid_resize=args.fid_resize,
                             batch_size=args.metric_batch)
  for reason in suite.skipped.values():
    print(f"imprint-jax evaluate: {reason}", file=sys.stderr)
  ckpt = None
  if args.ckpt:
    ckpt = ckpt_lib.resolve(args.ckpt, args.which)
    run_ = dataclasses.replace(run_, settings={**run_.settings, "ckpt": str(ckpt)})
  if ckpt is not None:
    print(f"imprint-jax evaluate: using {ckpt_lib.describe(ckpt, ckpt_lib.read_meta(ckpt))}",
          file=sys.stderr)
    if "imprint" in methods:
      raise UserError("--name imprint is the model's row; give the --images method another"
                      " --name")
    methods = {"imprint": model_generator(ckpt, steps=args.steps, guidance=args.guidance,
                                          batch_size=args.batch_size, seed=args.seed,
                                          dtype=args.dtype, param_dtype=args.param_dtype,
                                          shard_params=args.shard_params), **methods}
  if args.baseline:
    if args.baseline in methods:
      raise UserError(f"--name {args.baseline} is the baseline's row; give the --images method"
                      " another --name")
    methods[args.baseline] = baselines.paint_by_example_generator(
        args.baseline_weights, steps=args.steps, guidance=args.guidance, seed=args.seed,
        batch_size=args.batch_size)
  nproc, pid = jax.process_count(), jax.process_index()
  if nproc == 1:
    report = runner.execute(run_, methods, suite, args.out, save_images=args.save_images,
                            write_inputs=args.write_inputs)
  else:
    shares = [runner.share_folder(args.out, k) for k in range(nproc)]
    mine = distributed.host_share(range(run_.pairs), pid, nproc)
    error = None
    try:
      with AtomicDir(shares[pid]) as tmp:
        runner.score_share(run_, methods, suite, tmp, mine, save_images=args.save_images,
                           write_inputs=args.write_inputs)
    except Exception as e:  # noqa: BLE001 - re-raised below, once the other hosts know
      error = e
    # A barrier: after it every share is complete, or every host knows that one failed.
    _, failed = distributed.gather_sums([len(mine), error is not None])
    if failed:
      shutil.rmtree(shares[pid], ignore_errors=True)
    if error is not None:
      raise error
    if failed:
      raise UserError(f"{failed} of {nproc} hosts failed (see their output); no report written")
    if pid != 0:
      print(f"evaluate: process {pid} of {nproc} scored {len(mine)} of {run_.pairs} pairs;"
            f" process 0 writes {Path(args.out) / 'metrics.json'}")
      return 0
    report = runner.write_report(run_, suite, list(methods), shares, args.out)
  print(markdown(report))
  print(f"wrote {Path(args.out) / 'metrics.json'} and metrics.md")
  return 0


def run_multiview(args: argparse.Namespace) -> int:
  """`evaluate --testset multiview` (one host)."""
  if distributed.requested(args):
    raise UserError("--testset multiview runs on one host: give it without --distributed or"
                    " --coordinator")
  encoders: dict[str, multiview.EmbedFn] = {}
  if args.dinov2:
    encoders["dinov2"] = multiview.dinov2_encoder(args.dinov2, args.batch_size)
  if args.ckpt:
    encoders["checkpoint"] = multiview.checkpoint_encoder(args.ckpt, args.batch_size)
  report = multiview.evaluate_multiview(args.root, args.out, encoders, split=args.split,
                                        limit=args.limit, seed=args.seed)
  print(multiview.markdown(report))
  print(f"wrote {Path(args.out) / 'metrics.json'}, metrics.md and tsne.png")
  return 0
