"""Flags of `imprint-jax import` and `imprint-jax export` (runners: `cli/convert.py`)."""

from __future__ import annotations

from imprint_jax import cli


def add_parser(sub) -> None:
  p = sub.add_parser("import", help=cli.help_line("import"),
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
  p.set_defaults(func=cli.runner("convert", "run_import"))

  p = sub.add_parser("export", help=cli.help_line("export"),
                     description="Writes a diffusers pipeline folder that PyTorch loads without"
                     " JAX: DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)."
                     " unet/ and vae/ (diffusers), image_encoder/ (transformers DINOv2),"
                     " adapter/ (the content adapter and its PyTorch code), scheduler/,"
                     " model_index.json, pipeline_imprint.py, imprint.json and a model card"
                     " README.md. Float32 weights always; --dtype adds diffusers variant files"
                     " (load with variant='fp16'/'bf16').")
  p.add_argument("ckpt", help="checkpoint folder, or a training workdir (local or gs://)")
  p.add_argument("--which", default="latest", metavar="latest|best|STEP", help=cli.WHICH_HELP)
  p.add_argument("--out", required=True, help="folder to create")
  p.add_argument("--dtype", action="append", default=[], choices=("float16", "bfloat16"),
                 help="also write this precision as a variant (fp16 / bf16); repeatable")
  p.add_argument("--sampler", choices=("ddim", "dpmpp_2m"), default=None,
                 help="the pipeline's scheduler (default ddim, or what an imported export"
                 " recorded)")
  p.set_defaults(func=cli.runner("convert", "run_export"))
