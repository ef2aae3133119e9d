"""`imprint-jax import` and `imprint-jax export`: PyTorch folders to a checkpoint and back."""

from __future__ import annotations

import argparse
import sys

from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax.convert import interop
from imprint_jax.errors import UserError


def run_import(args: argparse.Namespace) -> int:
  if args.export is not None:
    if any(v is not None for v in (args.sd, args.unet, args.vae, args.dinov2)):
      raise UserError("--export reads a whole exported folder: give it without"
                      " --sd/--unet/--vae/--dinov2")
    path = interop.import_export(args.export, args.out)
    print(f"wrote {path}")
    return 0
  if args.dinov2 is None:
    raise UserError("give --dinov2 DIR (with --sd or --unet/--vae), or --export DIR")
  path = interop.import_pretrained(sd=args.sd, unet=args.unet, vae=args.vae,
                                   dinov2=args.dinov2, out=args.out,
                                   adapter_depth=args.adapter_depth,
                                   adapter_heads=args.adapter_heads, seed=args.seed)
  print(f"wrote {path}")
  return 0


def run_export(args: argparse.Namespace) -> int:
  ckpt = ckpt_lib.resolve(args.ckpt, args.which)
  print(f"using {ckpt_lib.describe(ckpt, ckpt_lib.read_meta(ckpt))}", file=sys.stderr)
  path = interop.export_pretrained(ckpt, args.out, dtypes=tuple(dict.fromkeys(args.dtype)),
                                   sampler=args.sampler)
  print(f"wrote {path}")
  return 0
