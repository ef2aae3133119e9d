"""`imprint-jax composite`: one composite (single mode) or a JSONL manifest of jobs (batch mode).

Thin layer over `imprint_jax.compositing`: argument checks, file naming, atomic writes, the
batch loop with its status file (`cli/manifest.py`). Inputs are validated before the model is
loaded, so a bad path or mask fails in a second, not after a minute of loading.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import itertools
import sys
from pathlib import Path
from typing import Any

import jax

from imprint_jax import compositing
from imprint_jax.cli import distributed
from imprint_jax.cli.distributed import host_share
from imprint_jax.cli.flags.composite import add_arguments
from imprint_jax.cli.manifest import (STATUS_FILE, Job, Status, host_status_file, merge_status,
                                      prepare_job, read_manifest)
from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.errors import UserError
from imprint_jax.models.imprint import ImprintConfig
from imprint_jax.progress import bar

_Job = Job  # the name tests/test_composite.py builds jobs with


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="imprint-jax composite")
  add_arguments(parser)
  return parser


def main(args: argparse.Namespace) -> int:
  """Runs single or batch mode; returns the exit status (UserError propagates: status 2)."""
  compositing.check_sampling(args.steps, args.guidance, args.sampler)
  if args.batch_size is not None and args.batch_size < 1:
    raise UserError(f"--batch-size {args.batch_size}: must be >= 1")
  if args.manifest:
    single = ["object", "object_mask", "background", "mask", "box", "mask_level"]
    used = [k for k in single if getattr(args, k) is not None]
    used += ["num_samples"] if args.num_samples != 1 else []
    if used:
      raise UserError(f"--{used[0].replace('_', '-')} is a single-mode option; with"
                      " --manifest give it per job in the manifest lines")
    distributed.initialize(args)
    return run_batch(args)
  if distributed.requested(args):
    raise UserError("--distributed/--coordinator split a --manifest over hosts; single mode"
                    " runs on one host")
  return run_single(args)


def _settings(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
  """The checkpoint folder and its E/G/context/prediction type; fails fast on a wrong stage."""
  ckpt = ckpt_lib.resolve(args.ckpt, args.which)
  meta = ckpt_lib.read_meta(ckpt)
  print(f"using {ckpt_lib.describe(ckpt, meta)}", file=sys.stderr)
  if "model" not in meta:
    raise UserError(f"{ckpt}: checkpoint metadata has no model config")
  cfg = ImprintConfig.from_dict(meta["model"])
  if cfg.stage != 2:
    raise UserError(f"{ckpt}: a stage-{cfg.stage} checkpoint (UNet with"
                    f" {cfg.unet.in_channels} input channels); compositing needs stage 2")
  settings = ckpt_lib.settings_from_meta(meta)
  for key in ("encoder_size", "generator_size", "context"):
    if getattr(args, key) is not None:
      settings[key] = getattr(args, key)
  return ckpt, settings


def _load(ckpt, settings: dict[str, Any], args: argparse.Namespace):
  return compositing.Compositor.from_checkpoint(
      ckpt, dtype=None if args.dtype == "auto" else args.dtype, param_dtype=args.param_dtype,
      shard_params=args.shard_params, **settings)


def _sample_paths(out: Path, n: int) -> list[Path]:
  if n == 1:
    return [out]
  return [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(n)]


def run_single(args: argparse.Namespace) -> int:
  for flag in ("object", "background"):
    if getattr(args, flag) is None:
      raise UserError(f"--{flag} is required (or give --manifest for batch mode)")
  if (args.mask is None) == (args.box is None):
    raise UserError("give exactly one of --mask MASK.png or --box x0,y0,x1,y1")
  out = Path(args.out)
  compositing.image_format(out)
  if out.is_dir():
    raise UserError(f"--out {out}: is a folder; single mode writes an image file")
  if args.num_samples < 1:
    raise UserError(f"--num-samples {args.num_samples}: must be >= 1")
  ckpt, settings = _settings(args)
  job = compositing.prepare(
      args.object, args.background, object_mask=args.object_mask, mask=args.mask,
      box=compositing.parse_box(args.box) if args.box is not None else None,
      mask_level=args.mask_level, seed=args.seed, num_samples=args.num_samples,
      feather=args.feather, encoder_size=settings["encoder_size"],
      generator_size=settings["generator_size"], context=settings["context"])
  comp = _load(ckpt, settings, args)
  images = comp.run([job], steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                    batch_size=args.batch_size)[0]
  for image, path in zip(images, _sample_paths(out, len(images))):
    compositing.save_image(image, path)
    print(f"wrote {path}")
  return 0


def run_batch(args: argparse.Namespace) -> int:
  """Batch mode. Host work runs in a thread pool (PIL and numpy release the GIL): the jobs of
  the next device batches are prepared and the previous batch's files are written while the
  device generates."""
  out_dir = Path(args.out)
  if out_dir.exists() and not out_dir.is_dir():
    raise UserError(f"--out {out_dir}: exists and is not a folder (batch mode writes a folder)")
  if args.workers < 1:
    raise UserError(f"--workers {args.workers}: must be >= 1")
  jobs = read_manifest(Path(args.manifest))
  if not jobs:
    raise UserError(f"--manifest {args.manifest}: no jobs in it")
  ckpt, settings = _settings(args)
  out_dir.mkdir(parents=True, exist_ok=True)
  nproc, pid = jax.process_count(), jax.process_index()
  jobs = host_share(jobs, pid, nproc)
  todo = [j for j in jobs if not (out_dir / f"{j.id}.png").exists()]
  skipped = len(jobs) - len(todo)
  ndev = len(jax.local_devices())
  batch = -(-max(1, min(args.batch_size, len(todo) or 1)) // ndev) * ndev
  progress = bar(total=len(todo), unit="job", desc="composite", file=sys.stderr,
                  disable=not todo)
  status = Status(out_dir / (STATUS_FILE if nproc == 1 else host_status_file(pid)), progress)

  def fail(job: Job, error: str) -> None:
    status.write({"id": job.id, "line": job.line, "status": "error", "error": error})

  def prepare(job: Job):
    if job.error is not None:
      return None, job.error
    try:
      return prepare_job(job, args, settings), None
    except UserError as e:
      return None, str(e)

  def finish(job: Job, p, crop) -> None:
    image = compositing.paste(p.background, crop, p.window, p.region, p.feather)
    record = {"id": job.id, "line": job.line, "status": "ok", "output": f"{job.id}.png",
              "seed": p.seed, "mask_level": p.mask_level}
    if not args.no_grids:
      compositing.save_image(compositing.grid(p, image), out_dir / f"{job.id}_grid.png")
      record["grid"] = f"{job.id}_grid.png"
    # The output is written last: its existence marks the job done for a resumed run.
    compositing.save_image(image, out_dir / f"{job.id}.png")
    status.write(record)

  def prepared(pool):
    """(job, Prepared) in manifest order, preparing up to two batches ahead."""
    ahead: collections.deque = collections.deque()
    pending_jobs = iter(todo)
    while True:
      while len(ahead) < 2 * batch:
        job = next(pending_jobs, None)
        if job is None:
          break
        ahead.append((job, pool.submit(prepare, job)))
      if not ahead:
        return
      job, future = ahead.popleft()
      p, error = future.result()
      if error is not None:
        fail(job, error)
      else:
        yield job, p

  comp = None
  writes: list = []
  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    stream = prepared(pool)
    while chunk := list(itertools.islice(stream, batch)):
      if comp is None:
        comp = _load(ckpt, settings, args)
      crops = comp.submit([(p, 0) for _, p in chunk], batch=batch, steps=args.steps,
                          guidance=args.guidance, sampler=args.sampler).result()
      for w in writes:  # the previous batch's files (re-raises a failed write)
        w.result()
      writes = [pool.submit(finish, job, p, crop) for (job, p), crop in zip(chunk, crops)]
    for w in writes:
      w.result()
  progress.close()
  ok, failed = status.ok, status.failed
  if nproc > 1:
    ok, skipped, failed = distributed.gather_sums([ok, skipped, failed])  # also a barrier
    if pid == 0:
      merge_status(out_dir)
  print(f"composite: {ok} done, {skipped} skipped (already done), {failed} failed; status in"
        f" {out_dir / STATUS_FILE}" + (f" (process {pid} of {nproc})" if nproc > 1 else ""))
  return 1 if failed else 0
