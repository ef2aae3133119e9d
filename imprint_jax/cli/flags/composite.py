"""Flags of `imprint-jax composite` (runner: `cli/composite.py`)."""

from __future__ import annotations

import argparse
import os

from imprint_jax import cli
from imprint_jax.cli.flags import add_distributed_arguments, add_memory_arguments

DEFAULT_BATCH_SIZE = 8  # compositing.DEFAULT_BATCH_SIZE, not imported: the flags load no JAX

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


def add_parser(sub) -> None:
  p = sub.add_parser("composite", help=cli.help_line("composite"))
  add_arguments(p)
  p.set_defaults(func=cli.runner("composite", "main"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the `composite` options (and its description) to `parser`."""
  parser.description = DESCRIPTION
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.add_argument("--ckpt", required=True, help="stage-2 checkpoint folder, or a training"
                      " workdir (local or gs://)")
  parser.add_argument("--which", default="latest", metavar="latest|best|STEP",
                      help=cli.WHICH_HELP)
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
  add_distributed_arguments(parser.add_argument_group("several hosts (batch mode)"))
  gen.add_argument("--encoder-size", type=int, help="override E (object crop side)")
  gen.add_argument("--generator-size", type=int, help="override G (generation crop side)")
  gen.add_argument("--context", type=float, help="override the crop context (crop side /"
                   " region box side)")
