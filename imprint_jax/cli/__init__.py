"""`imprint-jax` command line: thin argument parsing over library functions.

Every subcommand turns a `UserError` (bad input) into one line on stderr and exit status 2.
Imports are lazy so that `plan` can set up virtual devices before JAX starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from imprint_jax.errors import UserError


def _add_import(sub) -> None:
  p = sub.add_parser("import", help="import PyTorch weights (SD + DINOv2, or an export) into one"
                     " checkpoint",
                     description="Reads a Stable Diffusion pipeline folder (model_index.json with"
                     " unet/ and vae/) or --unet/--vae folders, and a transformers DINOv2 folder;"
                     " adds a freshly initialised content adapter; writes an orbax checkpoint"
                     " that `train` (init.checkpoint) and `composite` accept. Or, with --export,"
                     " reads a folder written by `imprint-jax export` back (all four networks,"
                     " bit-exact, with its sizes, context and prediction type). Only safetensors"
                     " files are read.")
  p.add_argument("--export", help="a folder written by `imprint-jax export` (instead of"
                 " --sd/--unet/--vae/--dinov2)")
  p.add_argument("--sd", help="diffusers Stable Diffusion pipeline folder")
  p.add_argument("--unet", help="diffusers UNet folder (instead of --sd)")
  p.add_argument("--vae", help="diffusers VAE folder (instead of --sd)")
  p.add_argument("--dinov2", help="transformers Dinov2Model or"
                 " Dinov2WithRegistersModel folder")
  p.add_argument("--out", required=True, help="checkpoint folder to create")
  p.add_argument("--adapter-depth", type=int, default=5)
  p.add_argument("--adapter-heads", type=int, default=1)
  p.add_argument("--seed", type=int, default=0, help="seed of the adapter's initialisation")
  p.set_defaults(func=_run_import)


def _run_import(args) -> int:
  from imprint_jax.convert import interop
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


def _add_export(sub) -> None:
  p = sub.add_parser("export", help="export a checkpoint as a diffusers pipeline folder",
                     description="Writes a diffusers pipeline folder that PyTorch loads without"
                     " JAX: DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)."
                     " unet/ and vae/ (diffusers), image_encoder/ (transformers DINOv2),"
                     " adapter/ (the content adapter and its PyTorch code), scheduler/,"
                     " model_index.json, pipeline_imprint.py, imprint.json and a model card"
                     " README.md. Float32 weights always; --dtype adds diffusers variant files"
                     " (load with variant='fp16'/'bf16').")
  p.add_argument("ckpt", help="checkpoint folder, or a training workdir (local or gs://)")
  p.add_argument("--which", default="latest", metavar="latest|best|STEP",
                 help=_which_help())
  p.add_argument("--out", required=True, help="folder to create")
  p.add_argument("--dtype", action="append", default=[], choices=("float16", "bfloat16"),
                 help="also write this precision as a variant (fp16 / bf16); repeatable")
  p.add_argument("--sampler", choices=("ddim", "dpmpp_2m"), default=None,
                 help="the pipeline's scheduler (default ddim, or what an imported export"
                 " recorded)")
  p.set_defaults(func=_run_export)


def _which_help() -> str:
  return ("for a training workdir: latest (default), best (lowest validation loss) or a step"
          " number")


def _run_export(args) -> int:
  from imprint_jax.convert import checkpoint as ckpt_lib
  from imprint_jax.convert import interop
  ckpt = ckpt_lib.resolve(args.ckpt, args.which)
  print(f"using {ckpt_lib.describe(ckpt, ckpt_lib.read_meta(ckpt))}", file=sys.stderr)
  path = interop.export_pretrained(ckpt, args.out, dtypes=tuple(dict.fromkeys(args.dtype)),
                                   sampler=args.sampler)
  print(f"wrote {path}")
  return 0


def _add_prepare(sub) -> None:
  from imprint_jax.data_prep import prepare
  p = sub.add_parser("prepare", help="prepare training pairs into ArrayRecord shards",
                     description=prepare.__doc__.splitlines()[0] if prepare.__doc__ else None)
  prepare.add_arguments(p)
  p.set_defaults(func=prepare.main)


def _add_train(sub) -> None:
  p = sub.add_parser("train", help="train stage 1 or stage 2",
                     description="Trains the config's stage on all local devices (and all"
                     " hosts, after jax.distributed.initialize). Writes checkpoints,"
                     " metrics.jsonl, TensorBoard events and sample grids to --workdir.")
  p.add_argument("--config", required=True,
                 help="a packaged config by name (stage1, stage2; NAME:tiny for the CPU"
                 " variant) or a config file (path.py[:arg])")
  p.add_argument("--workdir", required=True)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set train.global_batch=512")
  p.add_argument("--resume", action="store_true",
                 help="continue from the workdir's latest intact checkpoint (exactly)")
  p.add_argument("--takeover", action="store_true",
                 help="take the workdir over from a run that holds its lease but is dead"
                 " (a live holder's lease is otherwise refused until it expires)")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (automatic on TPU VMs; elsewhere give"
                 " --coordinator, --num-processes, --process-id)")
  p.add_argument("--coordinator", help="host:port of process 0")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)
  p.set_defaults(func=_run_train)


def _run_train(args) -> int:
  if args.distributed or args.coordinator:
    import jax
    kw = {}
    if args.coordinator:
      kw = dict(coordinator_address=args.coordinator, num_processes=args.num_processes,
                process_id=args.process_id)
      # Only used by the CPU backend (local multi-process runs and tests); harmless elsewhere.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
  from imprint_jax.train import loop, run_config
  config = run_config.load(args.config, args.set)
  loop.train(config, args.workdir, resume=args.resume, takeover=args.takeover)
  return 0


def _add_encode_objects(sub) -> None:
  p = sub.add_parser("encode-objects", help="stage 2: precompute the frozen DINOv2's object"
                     " tokens of every pair (train with --set data.object_tokens=OUT)",
                     description="Runs the stage-2 run's frozen DINOv2 (from init.checkpoint and"
                     " init.encoder_from) once over the objects of every pair of every data"
                     " source (train and validation splits), each in --variants random"
                     " perturbations, and writes them as float16 token shards. Training with"
                     " --set data.object_tokens=OUT then runs the adapter on these tokens"
                     " instead of DINOv2 in every step; a step picks one variant per pair.")
  p.add_argument("--config", required=True,
                 help="stage2[:tiny] (packaged config) or a config file (path.py[:arg])")
  p.add_argument("--out", required=True, help="token folder to create")
  p.add_argument("--variants", type=int, default=4,
                 help="perturbations stored per pair (default 4)")
  p.add_argument("--batch", type=int, default=None,
                 help="images per encoder call over all hosts (default: train.global_batch)")
  _add_store_arguments(p)
  p.set_defaults(func=_run_encode_objects)


def _add_store_arguments(p) -> None:
  """The arguments `encode-objects` and `encode-latents` share."""
  p.add_argument("--workdir", default=None,
                 help="the training run's workdir (needed for synthetic: data sources)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, as for train")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host, as for train)")


def _store_config(args):
  """The run config of an `encode-*` command (after jax.distributed, when asked)."""
  if args.distributed:
    import jax
    jax.distributed.initialize()
  from imprint_jax.train import run_config
  return run_config.load(args.config, args.set)


def _run_encode_objects(args) -> int:
  config = _store_config(args)
  from imprint_jax.train import encode_objects
  out = encode_objects.encode(config, args.out, variants=args.variants, batch=args.batch,
                              workdir=args.workdir)
  print(f"wrote {out}")
  return 0


def _add_encode_latents(sub) -> None:
  p = sub.add_parser("encode-latents", help="stage 2: precompute the frozen VAE's latents of"
                     " every pair's target and masked backgrounds (train with --set"
                     " data.latents=OUT)",
                     description="Runs the stage-2 run's frozen VAE encoder (from"
                     " init.checkpoint; init.encoder_from is not needed) once over every pair"
                     " of every data source (train and validation splits): its target, and its masked background under each"
                     " stored mask (level 1 and 4 once, levels 2 and 3 in --mask-draws random"
                     " draws; the levels with a positive data.mask_level_probs). Writes the"
                     " posteriors (mean and log-variance, float16) and the masks. Training with"
                     " --set data.latents=OUT then skips the VAE encoder: a step draws the"
                     " mask level as usual, one stored mask of that level, and samples the"
                     " latents from the stored posteriors with its own key. The trade: levels 2"
                     " and 3 see --mask-draws shapes per pair instead of a new one per step.")
  p.add_argument("--config", required=True,
                 help="stage2[:tiny] (packaged config) or a config file (path.py[:arg])")
  p.add_argument("--out", required=True, help="latent folder to create")
  p.add_argument("--mask-draws", type=int, default=2,
                 help="masks stored per pair at levels 2 and 3 (default 2)")
  p.add_argument("--batch", type=int, default=None,
                 help="images per encoder call over all hosts (default: train.global_batch);"
                 " a pair takes 1 + its stored masks")
  _add_store_arguments(p)
  p.set_defaults(func=_run_encode_latents)


def _run_encode_latents(args) -> int:
  config = _store_config(args)
  from imprint_jax.train import encode_objects
  out = encode_objects.encode_latents(config, args.out, mask_draws=args.mask_draws,
                                      batch=args.batch, workdir=args.workdir)
  print(f"wrote {out}")
  return 0


def _add_plan(sub) -> None:
  p = sub.add_parser("plan", help="compile the full-size step for a mesh (virtual CPU devices"
                     " or a TPU topology) and print per-device memory",
                     description="Compiles the training step of CONFIG for the given mesh with"
                     " abstract inputs (nothing is allocated) and prints per-device memory:"
                     " parameters, optimizer state, activations (XLA's temporary buffers for"
                     " the step), and whether it fits. Without --topology the step is compiled"
                     " for virtual CPU devices (an upper estimate: the CPU compiler schedules"
                     " for speed, not memory); with --topology it is compiled by the TPU"
                     " compiler for that slice, from this host, with no TPU attached (needs"
                     " libtpu: pip install 'imprint-jax[tpu]'). Exit status 1 when it does not fit in"
                     " --hbm-gib.")
  p.add_argument("--config", required=True)
  p.add_argument("--mesh", required=True, help="data=D,fsdp=F,tensor=T")
  p.add_argument("--topology", default=None, help="TPU slice to compile for, as"
                 " VERSION:SHAPE, e.g. v5e:4x4 (16 chips), v5p:4x4x4 (64 chips), v6e:8x8;"
                 " the mesh must use every device of the slice")
  p.add_argument("--hbm-gib", type=float, default=None, help="memory per chip, e.g. 95 (v5p)"
                 " or 16 (v5e); default with --topology: the HBM of a v5e/v5p/v6e chip")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.set_defaults(func=_run_plan)


def _parse_mesh(text: str) -> dict[str, int]:
  out = {}
  for part in text.split(","):
    k, sep, v = part.partition("=")
    if not sep:
      raise UserError(f"--mesh {text!r}: expected data=D,fsdp=F,tensor=T")
    try:
      out[k.strip()] = int(v)
    except ValueError:
      raise UserError(f"--mesh {text!r}: {v!r} is not an integer") from None
  return out


def _run_plan(args) -> int:
  import math
  mesh = _parse_mesh(args.mesh)
  if any(v < 1 for v in mesh.values()):
    raise UserError("--mesh sizes must be positive for plan")
  n = math.prod(mesh.values())
  if args.topology:
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
      raise UserError("--topology needs the TPU compiler (libtpu): pip install 'imprint-jax[tpu]'")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU metadata server to ask
  else:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  from imprint_jax.train import run_config
  from imprint_jax.parallel import plan
  config = run_config.load(args.config, args.set)
  devices, hbm_gib = None, args.hbm_gib
  if args.topology:
    devices = plan.topology_devices(args.topology)
    if len(devices) != n:
      raise UserError(f"--mesh {args.mesh} has {n} devices but topology {args.topology} has"
                      f" {len(devices)} ({devices[0].device_kind})")
    if hbm_gib is None:
      hbm_gib = plan.hbm_gib(devices[0].device_kind)
  fits = plan.print_plan(plan.plan(config, mesh, devices=devices), hbm_gib=hbm_gib)
  return 0 if fits else 1


def _add_composite(sub) -> None:
  from imprint_jax.cli import composite as composite_cli
  p = sub.add_parser("composite", help="composite objects into backgrounds (one image, or a"
                     " JSONL manifest in device batches)")
  composite_cli.add_arguments(p)
  p.set_defaults(func=composite_cli.main)


def _add_evaluate(sub) -> None:
  from imprint_jax.evaluation import runner as evaluate
  p = sub.add_parser(
      "evaluate", help="score a checkpoint (or another method's composites) with the paper's"
      " metrics: CLIP, DINO, DreamSim, FID",
      description="Composites every pair of a prepared Pixabay or DreamBooth test set with a"
      " stage-2 checkpoint (and/or reads another method's composites from --images), adds the"
      " copy-and-paste baseline, and writes metrics.json and a Markdown table (IMPRINT Sec."
      " 4.2-4.3). A metric whose weights are missing is skipped with one line.",
      epilog=evaluate.epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
  evaluate.add_arguments(p)
  p.set_defaults(func=evaluate.main)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="imprint-jax", description="IMPRINT generative object"
                                   " compositing in JAX: import weights, prepare data, train,"
                                   " composite, export.",
                                   epilog="On the CPU every command but plan runs JAX's"
                                   " computations on the calling thread and keeps freed memory"
                                   " for reuse (imprint_jax/parallel/cpu_runtime.py);"
                                   " IMPRINT_JAX_CPU_RUNTIME=default keeps JAX's and glibc's"
                                   " defaults.")
  sub = parser.add_subparsers(dest="command", required=True)
  for add in (_add_import, _add_export, _add_prepare, _add_train, _add_encode_objects,
              _add_encode_latents, _add_plan, _add_composite, _add_evaluate):
    add(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    if args.command != "plan":  # plan sets JAX's environment itself and runs no steps
      from imprint_jax.parallel import cpu_runtime
      logging.getLogger(__name__).info("%s", cpu_runtime.configure())  # before JAX starts
    return int(args.func(args) or 0)
  except UserError as e:
    print(f"imprint-jax {args.command}: error: {e}", file=sys.stderr)
    return UserError.exit_code
  except KeyboardInterrupt:
    print(f"imprint-jax {args.command}: interrupted", file=sys.stderr)
    return 130


