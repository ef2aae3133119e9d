"""`imprint-jax composite`: one composite (single mode) or a JSONL manifest of jobs (batch mode).

Thin layer over `imprint_jax.compositing`: argument checks, file naming, atomic writes, the
batch loop with its status file. Inputs are validated before the model is loaded, so a bad
path or mask fails in a second, not after a minute of loading.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import itertools
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

from imprint_jax.errors import UserError

# JAX and the models are imported inside the functions: building the `imprint-jax` parser must
# not start JAX (`plan` sets up virtual devices first).

DESCRIPTION = """\
Composite an object into a background with a stage-2 IMPRINT checkpoint.

Single mode:
  imprint-jax composite --ckpt CKPT --object OBJ.png [--object-mask M.png] \\
      --background BG.jpg (--mask MASK.png | --box x0,y0,x1,y1) [--mask-level 1..4] \\
      --out OUT.png [--steps 50] [--guidance 5.0] [--seed 0] [--num-samples N]
  writes OUT.png (N > 1: OUT_0.png .. OUT_{N-1}.png) at the background's full resolution.

Batch mode:
  imprint-jax composite --ckpt CKPT --manifest jobs.jsonl --out DIR [--batch-size B]
  jobs.jsonl holds one JSON object per line:
    {"object": "o.png", "object_mask": "m.png"?, "background": "b.jpg",
     "mask": "r.png" | "box": [x0, y0, x1, y1], "mask_level": 1..4?, "seed": 0?,
     "feather": px?, "id": "name"?}
  (relative paths are relative to the manifest's folder; id defaults to the line number,
  000001 for the first line). Jobs of any background size share device batches. Writes
  DIR/ID.png, DIR/ID_grid.png (object | background with the region in red | composite) and
  appends one line per job to DIR/status.jsonl ({"id", "status": "ok" | "error", "error"?}).
  Resumable: a job whose DIR/ID.png exists is skipped; failed jobs are retried.

The object is segmented by --object-mask, else by its alpha channel, else it is the whole
image. The region to fill is --mask (shape guidance level 1, or coarsened to --mask-level
2..4) or --box (level 4). Outside the region, beyond a seam of --feather pixels (default 2%
of the crop side, at least 3), the output keeps the background's pixels exactly. E, G and
the crop context come from the checkpoint's training config (default 224, 512, 2.0).
Outputs are written atomically (temporary name, then rename).

Memory: --param-dtype bfloat16 casts the parameters once at load (half of float32's memory);
--shard-params splits them over the local devices when they do not fit one (auto), always or
never (a full copy on each device). The batch is split over the local devices either way.

Several hosts (batch mode): start the same command on every host with --distributed (TPU VMs)
or --coordinator HOST:PORT --num-processes N --process-id I. Manifest line k goes to host
k mod N, which runs it on its own devices; each host appends to DIR/status.process-I.jsonl and
host 0 merges them into DIR/status.jsonl (in manifest order) once every host is done. --out
must be a folder that every host sees (a shared file system). Resuming works as on one host.

Exit status: 0 success; 2 bad input (one line on stderr, nothing written); batch mode: 1 if
any job failed (see DIR/status.jsonl; the other jobs are still done)."""

JOB_KEYS = {"object", "object_mask", "background", "mask", "box", "mask_level", "seed",
            "feather", "id"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATUS_FILE = "status.jsonl"
DEFAULT_BATCH_SIZE = 8  # = compositing.DEFAULT_BATCH_SIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `composite` options (and its description) to `parser`."""
  parser.description = DESCRIPTION
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.add_argument("--ckpt", required=True, help="stage-2 checkpoint folder, or a training"
                      " workdir (local or gs://)")
  parser.add_argument("--which", default="latest", metavar="latest|best|STEP",
                      help=_which_help())
  parser.add_argument("--out", required=True, help="single mode: output image (.png, .jpg);"
                      " batch mode: output folder")
  single = parser.add_argument_group("single mode")
  single.add_argument("--object", help="object image (RGBA: its alpha segments the object)")
  single.add_argument("--object-mask", help="mask of the object in --object (white = object)")
  single.add_argument("--background", help="background image")
  single.add_argument("--mask", help="region to fill, same size as the background (white)")
  single.add_argument("--box", help="region to fill as x0,y0,x1,y1 in background pixels"
                      " (x1, y1 exclusive)")
  single.add_argument("--mask-level", type=int, choices=(1, 2, 3, 4), help="shape guidance:"
                      " 1 = the mask as given, 2-3 = coarser silhouettes, 4 = its box"
                      " (default 1 for --mask, 4 for --box)")
  single.add_argument("--num-samples", type=int, default=1,
                      help="samples to generate (N > 1 writes OUT_0.png, OUT_1.png, ...)")
  batch = parser.add_argument_group("batch mode")
  batch.add_argument("--manifest", help="JSONL file of jobs (see above)")
  batch.add_argument("--no-grids", action="store_true", help="do not write DIR/ID_grid.png")
  batch.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="host threads that read, crop and write images (default"
                     " %(default)s)")
  gen = parser.add_argument_group("generation")
  gen.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
  gen.add_argument("--guidance", type=float, default=5.0,
                   help="classifier-free guidance scale (1 = none; default 5.0)")
  gen.add_argument("--seed", type=int, default=0, help="noise seed (batch mode: for jobs"
                   " without one); the same seed gives the same output")
  gen.add_argument("--sampler", choices=("ddim", "dpmpp_2m"), default="ddim")
  gen.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per device call, both modes (rounded up to a multiple of the"
                   " device count; default %(default)s)")
  gen.add_argument("--feather", type=float, default=None,
                   help="seam width in background pixels (default 2%% of the crop side, >= 3)")
  gen.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
  add_memory_arguments(gen)
  multi = parser.add_argument_group("several hosts (batch mode)")
  multi.add_argument("--distributed", action="store_true",
                     help="call jax.distributed.initialize() (automatic on TPU VMs; elsewhere"
                     " give --coordinator, --num-processes, --process-id)")
  multi.add_argument("--coordinator", help="host:port of process 0")
  multi.add_argument("--num-processes", type=int)
  multi.add_argument("--process-id", type=int)
  gen.add_argument("--encoder-size", type=int, help="override E (object crop side)")
  gen.add_argument("--generator-size", type=int, help="override G (generation crop side)")
  gen.add_argument("--context", type=float, help="override the crop context (crop side /"
                   " region box side)")


def add_memory_arguments(parser) -> None:
  """--param-dtype and --shard-params (also used by `imprint-jax evaluate`)."""
  parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                      help="cast the parameters to this dtype once at load (default: as"
                      " stored, float32); bfloat16 halves their memory")
  parser.add_argument("--shard-params", choices=("auto", "always", "never"), default="auto",
                      help="split the parameters over the local devices (fsdp-style) instead"
                      " of a full copy on each: auto = when they take more than half of one"
                      " device's memory (never on CPU); default %(default)s")


def init_distributed(args: argparse.Namespace) -> None:
  """jax.distributed.initialize() for --distributed / --coordinator (as `train` does)."""
  if not (args.distributed or args.coordinator):
    if args.num_processes is not None or args.process_id is not None:
      raise UserError("--num-processes/--process-id need --coordinator HOST:PORT")
    return
  import jax
  kw = {}
  if args.coordinator:
    if args.num_processes is None or args.process_id is None:
      raise UserError("--coordinator needs --num-processes and --process-id")
    kw = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
              process_id=args.process_id)
    # Only used by the CPU backend (local multi-process runs and tests); harmless elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kw)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="imprint-jax composite")
  add_arguments(parser)
  return parser


def main(args: argparse.Namespace) -> int:
  """Runs single or batch mode; returns the exit status (UserError propagates: status 2)."""
  from imprint_jax import compositing
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
    init_distributed(args)
    return run_batch(args)
  if args.distributed or args.coordinator:
    raise UserError("--distributed/--coordinator split a --manifest over hosts; single mode"
                    " runs on one host")
  return run_single(args)


def _which_help() -> str:
  return ("for a training workdir: latest (default), best (lowest validation loss) or a step"
          " number")


def _settings(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
  """The checkpoint folder and its E/G/context/prediction type; fails fast on a wrong stage."""
  from imprint_jax.convert import checkpoint as ckpt_lib
  from imprint_jax import compositing
  from imprint_jax.models.imprint import ImprintConfig
  ckpt = ckpt_lib.resolve(args.ckpt, args.which)
  meta = ckpt_lib.read_meta(ckpt)
  print(f"using {ckpt_lib.describe(ckpt, meta)}", file=sys.stderr)
  if "model" not in meta:
    raise UserError(f"{ckpt}: checkpoint metadata has no model config")
  cfg = ImprintConfig.from_dict(meta["model"])
  if cfg.stage != 2:
    raise UserError(f"{ckpt}: a stage-{cfg.stage} checkpoint (UNet with"
                    f" {cfg.unet.in_channels} input channels); compositing needs stage 2")
  settings = compositing.settings_from_meta(meta)
  for key in ("encoder_size", "generator_size", "context"):
    if getattr(args, key) is not None:
      settings[key] = getattr(args, key)
  return ckpt, settings


def _load(ckpt, settings: dict[str, Any], args: argparse.Namespace):
  from imprint_jax import compositing
  return compositing.Compositor.from_checkpoint(
      ckpt, dtype=None if args.dtype == "auto" else args.dtype, param_dtype=args.param_dtype,
      shard_params=args.shard_params, **settings)


def _sample_paths(out: Path, n: int) -> list[Path]:
  if n == 1:
    return [out]
  return [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(n)]


def run_single(args: argparse.Namespace) -> int:
  from imprint_jax import compositing
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


# ---------------------------------------------------------------------------------------------
# Batch mode.


@dataclasses.dataclass
class _Job:
  """A manifest line: its number, output id, the parsed job (None if unparsable), an error."""
  line: int
  id: str
  spec: dict[str, Any] | None
  error: str | None


def read_manifest(path: Path) -> list[_Job]:
  """Parses a JSONL manifest; a bad line becomes a job carrying its error (not an abort)."""
  if not path.is_file():
    raise UserError(f"--manifest {path}: no such file")
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"--manifest {path}: unreadable ({type(e).__name__})") from None
  base = path.parent
  jobs: list[_Job] = []
  seen: set[str] = set()
  for n, text in enumerate(lines, start=1):
    text = text.strip()
    if not text or text.startswith("#"):
      continue
    default_id = f"{n:06d}"
    try:
      spec = json.loads(text)
    except ValueError as e:
      jobs.append(_Job(n, default_id, None, f"line {n}: not valid JSON ({e.msg})"))
      continue
    if not isinstance(spec, dict):
      jobs.append(_Job(n, default_id, None, f"line {n}: expected a JSON object"))
      continue
    job_id = spec.get("id", default_id)
    error = None
    if not isinstance(job_id, str) or not _ID_RE.match(job_id):
      error, job_id = (f"line {n}: id {job_id!r} is not a plain file name (letters, digits,"
                       " '.', '_', '-')"), default_id
    elif job_id in seen:
      error, job_id = f"line {n}: duplicate id {job_id!r}", f"{default_id}-dup"
    unknown = sorted(set(spec) - JOB_KEYS)
    if error is None and unknown:
      error = f"line {n}: unknown key {unknown[0]!r} (expected {', '.join(sorted(JOB_KEYS))})"
    for key in ("object", "background"):
      if error is None and not isinstance(spec.get(key), str):
        error = f"line {n}: {key!r} (a file path) is required"
    for key in ("object", "object_mask", "background", "mask"):
      if error is None and key in spec:
        if not isinstance(spec[key], str):
          error = f"line {n}: {key!r} must be a file path"
        else:
          spec[key] = str(base / spec[key])
    seen.add(job_id)
    jobs.append(_Job(n, job_id, spec, error))
  return jobs


def _prepare_job(job: _Job, args: argparse.Namespace, settings: dict[str, Any]):
  from imprint_jax import compositing
  s = job.spec
  box = s.get("box")
  if isinstance(box, str):
    box = compositing.parse_box(box)
  elif box is not None and not (isinstance(box, list) and len(box) == 4):
    raise UserError(f"box {box!r}: expected [x0, y0, x1, y1] or \"x0,y0,x1,y1\"")
  for key in ("seed", "mask_level"):
    if key in s and (not isinstance(s[key], int) or isinstance(s[key], bool)):
      raise UserError(f"{key} {s[key]!r}: expected an integer")
  feather = s.get("feather", args.feather)
  if feather is not None and (not isinstance(feather, (int, float)) or isinstance(feather, bool)):
    raise UserError(f"feather {feather!r}: expected a number of pixels")
  return compositing.prepare(
      s["object"], s["background"], object_mask=s.get("object_mask"), mask=s.get("mask"),
      box=box, mask_level=s.get("mask_level"), seed=s.get("seed", args.seed),
      feather=feather, encoder_size=settings["encoder_size"],
      generator_size=settings["generator_size"], context=settings["context"])


class _Status:
  """Appends one JSON line per finished or failed job to DIR/status.jsonl (thread-safe)."""

  def __init__(self, path: Path, progress):
    self.path = path
    self.progress = progress
    self.ok = self.failed = 0
    self._lock = threading.Lock()

  def write(self, record: dict[str, Any]) -> None:
    with self._lock:
      if record["status"] == "ok":
        self.ok += 1
      else:
        self.failed += 1
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      self.progress.update(1)


def run_batch(args: argparse.Namespace) -> int:
  """Batch mode. Host work runs in a thread pool (PIL and numpy release the GIL): the jobs of
  the next device batches are prepared and the previous batch's files are written while the
  device generates."""
  import jax
  from imprint_jax.progress import bar

  from imprint_jax import compositing

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
  status = _Status(out_dir / (STATUS_FILE if nproc == 1 else host_status_file(pid)), progress)

  def fail(job: _Job, error: str) -> None:
    status.write({"id": job.id, "line": job.line, "status": "error", "error": error})

  def prepare(job: _Job):
    if job.error is not None:
      return None, job.error
    try:
      return _prepare_job(job, args, settings), None
    except UserError as e:
      return None, str(e)

  def finish(job: _Job, p, crop) -> None:
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
    ok, skipped, failed = _gather_counts([ok, skipped, failed])  # also a barrier
    if pid == 0:
      merge_status(out_dir)
  print(f"composite: {ok} done, {skipped} skipped (already done), {failed} failed; status in"
        f" {out_dir / STATUS_FILE}" + (f" (process {pid} of {nproc})" if nproc > 1 else ""))
  return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Several hosts: each runs a share of the manifest and writes its own status file.


def host_share(jobs: list[_Job], pid: int, nproc: int) -> list[_Job]:
  """The jobs of host `pid` of `nproc`: every nproc-th one. Chosen by position in the
  manifest, not among the jobs still to do, so every host agrees on the split whatever the
  other hosts have already written (and a resumed run gives each job to the same host)."""
  return jobs[pid::nproc]


def host_status_file(pid: int) -> str:
  return f"status.process-{pid}.jsonl"


def _gather_counts(counts: list[int]) -> list[int]:
  """Sums of `counts` over all processes; returns once every process has called it."""
  import numpy as np
  from jax.experimental import multihost_utils
  every = multihost_utils.process_allgather(np.asarray(counts, np.int64))
  return [int(v) for v in np.asarray(every).reshape(-1, len(counts)).sum(axis=0)]


def merge_status(out_dir: Path) -> Path:
  """Appends the records of every DIR/status.process-*.jsonl to DIR/status.jsonl, in manifest
  line order (stable: a job's records keep their order), then removes those files. The new
  status.jsonl is written under a temporary name and renamed; per-host files left by a run
  that stopped early are merged by the next run that finishes."""
  parts = sorted(out_dir.glob("status.process-*.jsonl"))
  if not parts:
    return out_dir / STATUS_FILE
  records = []
  for part in parts:
    for text in part.read_text().splitlines():
      try:
        records.append(json.loads(text))
      except ValueError:  # empty, or a line cut short by a host that was stopped
        continue
  records.sort(key=lambda r: r.get("line", 0))
  path = out_dir / STATUS_FILE
  old = path.read_text() if path.exists() else ""
  if old and not old.endswith("\n"):
    old += "\n"
  tmp = out_dir / f".{STATUS_FILE}.tmp-{os.getpid()}"
  tmp.write_text(old + "".join(json.dumps(r) + "\n" for r in records))
  os.replace(tmp, path)
  for part in parts:
    part.unlink()
  return path
