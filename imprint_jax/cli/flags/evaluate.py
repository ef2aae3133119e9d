"""Flags of `imprint-jax evaluate` (runner: `cli/evaluate.py`)."""

from __future__ import annotations

import argparse

from imprint_jax import cli
from imprint_jax.cli.flags import add_distributed_arguments, add_memory_arguments
from imprint_jax.evaluation.baselines import BASELINES
from imprint_jax.evaluation.metrics.fid import CONVERT_INCEPTION
from imprint_jax.evaluation.report import TESTSETS

DESCRIPTION = ("Composites every pair of a prepared Pixabay or DreamBooth test set with a"
               " stage-2 checkpoint (and/or reads another method's composites from --images),"
               " adds the copy-and-paste baseline, and writes metrics.json and a Markdown table"
               " (IMPRINT Sec. 4.2-4.3). A metric whose weights are missing is skipped with one"
               " line.")

EPILOG = """\
Metric weights (local files only; a metric whose weights are missing is skipped with one line):
  CLIP       hf download openai/clip-vit-large-patch14 config.json model.safetensors
               --local-dir DIR, then --clip DIR
  DINO       hf download facebook/dino-vits16 config.json model.safetensors --local-dir DIR,
               then --dino DIR
             (safetensors; a folder holding only pytorch_model.bin is refused)
  FID        download https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/\
pt_inception-2015-12-05-6726825d.pth and convert it once (we never unpickle):
             {convert}
             then --inception pt_inception-2015-12-05-6726825d.safetensors
  DreamSim   pip install 'imprint-jax[eval]'; --dreamsim-dir DIR
Writes <out>/metrics.json, metrics.md (table), scores.jsonl (per pair), images/<method>/."""


def add_parser(sub) -> None:
  p = sub.add_parser("evaluate", help=cli.help_line("evaluate"), description=DESCRIPTION,
                     epilog=EPILOG.format(convert=CONVERT_INCEPTION),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(p)
  p.set_defaults(func=cli.runner("evaluate", "run"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `imprint-jax evaluate` flags."""
  parser.add_argument("--ckpt", help="stage-2 checkpoint or training workdir to evaluate"
                      " (local or gs://)")
  parser.add_argument("--which", default="latest", metavar="latest|best|STEP",
                      help="for a training workdir: latest (default), best (lowest validation"
                      " loss) or a step number")
  parser.add_argument("--images", metavar="DIR", help="instead of (or beside) --ckpt: a folder"
                      " of another method's composites, one per pair named <pair_id>.png"
                      " (AnyDoor, Paint-by-Example, ...)")
  parser.add_argument("--name", help="table name of the --images method (default: the folder"
                      " name)")
  parser.add_argument("--baseline", choices=BASELINES, help="also run this method on exactly"
                      " the same inputs and score it beside the others: paint-by-example"
                      " (diffusers' PaintByExamplePipeline, PyTorch; weights from"
                      " --baseline-weights)")
  parser.add_argument("--baseline-weights", metavar="DIR", help="the --baseline's local"
                      " pipeline folder (save_pretrained layout, e.g. Fantasy-Studio/"
                      "Paint-by-Example)")
  parser.add_argument("--all-instances", action="store_true", help="pixabay: accept several"
                      " pairs per image (the paper's protocol, and the default, is one object"
                      " per image: `prepare --instances largest`)")
  parser.add_argument("--testset", required=True, choices=TESTSETS + ("multiview",),
                      help="pixabay, dreambooth (compositing), or multiview: how well the"
                      " encoder keeps one object's views together (nearest-neighbour view"
                      " retrieval, silhouette, t-SNE PNG) for --dinov2 and/or the --ckpt's"
                      " DINOv2 on a view dataset (`imprint_jax/evaluation/multiview.py`)")
  parser.add_argument("--dinov2", metavar="DIR", help="multiview: the original DINOv2"
                      " (transformers folder) to compare with the --ckpt's")
  parser.add_argument("--root", required=True, help="test set folder written by `imprint-jax"
                      " prepare` (pixabay: --source images; dreambooth: --source dreambooth)")
  parser.add_argument("--split", default="test", help="split to read (default: test)")
  parser.add_argument("--out", required=True, help="report folder to write (replaced when"
                      " complete)")
  parser.add_argument("--clip", metavar="DIR", help="openai/clip-vit-large-patch14 folder"
                      " (transformers, safetensors; clip-vit-base-patch32 works too)")
  parser.add_argument("--dino", metavar="DIR", help="facebook/dino-vits16 folder"
                      " (transformers ViTModel, safetensors)")
  parser.add_argument("--inception", metavar="FILE", help="pytorch-fid's FID Inception weights"
                      " converted to safetensors (pt_inception-2015-12-05-6726825d.safetensors;"
                      " the one-line conversion is below)")
  parser.add_argument("--dreamsim-dir", metavar="DIR", help="DreamSim weights folder (its"
                      " cache_dir). DreamSim is PyTorch only and an optional extra: without"
                      " the `dreamsim` package the run prints 'DreamSim skipped: pip install"
                      " 'imprint-jax[eval]' and pass --dreamsim-dir' and scores the"
                      " rest")
  parser.add_argument("--fid-resize", default="pil-bicubic", choices=("pil-bicubic",
                      "torch-bilinear"), help="resize to 299 for FID: clean-fid style PIL"
                      " bicubic on uint8 (default) or pytorch-fid's bilinear")
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
  parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance"
                      " scale (default 5)")
  parser.add_argument("--batch-size", type=int, default=8, help="pairs per generation call")
  parser.add_argument("--metric-batch", type=int, default=32, help="images per metric-network"
                      " call")
  parser.add_argument("--limit", type=int, help="evaluate only the first N pairs")
  parser.add_argument("--mask-level", type=int, default=4, choices=(1, 2, 3, 4),
                      help="shape guidance of the region for Pixabay (4 = box)")
  parser.add_argument("--seed", type=int, default=0, help="seeds the Pixabay object"
                      " perturbation and the model's noise, per pair id")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="model compute dtype"
                      " (default: bfloat16 on GPU/TPU, float32 on CPU)")
  add_memory_arguments(parser)  # --param-dtype, --shard-params
  parser.add_argument("--save-images", action=argparse.BooleanOptionalAction, default=True,
                      help="write every composite to <out>/images/<method>/")
  parser.add_argument("--write-inputs", action="store_true", help="write each pair's inputs"
                      " (object, object mask, background, region) to <out>/inputs/, to run"
                      " other methods on exactly these pairs")
  add_distributed_arguments(parser.add_argument_group(
      "several hosts (pixabay, dreambooth)",
      "Start the same command on every host: host k of N scores pairs k, k + N, ...\n"
      "on its own devices into a share folder beside --out (a folder every host sees),\n"
      "and host 0 merges the shares into one report, the same as one host writes."))
