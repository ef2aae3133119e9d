"""Flags of `imprint-jax train`, `encode-objects` and `encode-latents` (runners:
`cli/train.py`)."""

from __future__ import annotations

from imprint_jax import cli
from imprint_jax.cli.flags import add_distributed_arguments


def add_parser(sub) -> None:
  p = sub.add_parser("train", help=cli.help_line("train"),
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
  add_distributed_arguments(p)
  p.set_defaults(func=cli.runner("train", "run_train"))

  p = sub.add_parser("encode-objects", help=cli.help_line("encode-objects"),
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
  p.set_defaults(func=cli.runner("train", "run_encode_objects"))

  p = sub.add_parser("encode-latents", help=cli.help_line("encode-latents"),
                     description="Runs the stage-2 run's frozen VAE encoder (from"
                     " init.checkpoint; init.encoder_from is not needed) once over every pair"
                     " of every data source (train and validation splits): its target, and its"
                     " masked background under each"
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
  p.set_defaults(func=cli.runner("train", "run_encode_latents"))


def _add_store_arguments(p) -> None:
  """The arguments `encode-objects` and `encode-latents` share."""
  p.add_argument("--workdir", default=None,
                 help="the training run's workdir (needed for synthetic: data sources)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, as for train")
  add_distributed_arguments(p)
