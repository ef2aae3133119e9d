"""`synthetic:<layout>` data sources of a run config -> prepared dataset folders.

Tiny configs (`configs/stage*.py:tiny`) train on `synthetic:<layout>` sources, so that a run
needs no data on disk. The trainer only opens prepared folders; whoever starts a run prepares
these first (the `imprint-jax train`, `encode-objects` and `encode-latents` commands, tests):

  from imprint_jax.data_prep import sources
  sources.prepare_sources(config, workdir)    # then train.loop.train(config, workdir)

Each becomes a small synthetic dataset in that published layout (`synthetic.generate`),
prepared (`prepare.prepare`) into `imprint_jax.data.prepared.synthetic_folder(...)`, once:
a folder already prepared is kept. The config itself is unchanged (it still names
`synthetic:<layout>`, and the trainer finds the folder by the same rule).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental import multihost_utils
import ml_collections

from imprint_jax import storage
from imprint_jax.data import prepared
from imprint_jax.data_prep import prepare, synthetic
from imprint_jax.errors import UserError


def prepare_synthetic(layout: str, out, config: ml_collections.ConfigDict) -> None:
  """Generates the synthetic `layout` dataset of a run config and prepares it into `out`.

  8 groups of 6 frames (in `<out>/../.raw_<layout>`), prepared at the config's
  data.encoder_size/generator_size with a quarter of the groups held out as "val".
  """
  out = Path(out)
  raw = out.parent / f".raw_{layout}"
  synthetic.generate(raw, synthetic.SyntheticConfig(groups=8, frames=6, seed=config.seed),
                     layouts=(layout,))
  cfg = prepare.PrepareConfig(encoder_size=config.data.encoder_size,
                              generator_size=config.data.generator_size, min_size=16,
                              val_fraction=0.25, seed=config.seed)
  prepare.prepare(layout, raw / layout, out, cfg, split="all", workers=1, progress=False)


def prepare_sources(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                    ) -> dict[str, Path]:
  """Prepares the config's `synthetic:<layout>` sources for a run in `workdir`.

  Process 0 builds what is missing; with several JAX processes all wait for it at a barrier
  (call it on every process). Returns {source: prepared folder} for the synthetic sources.
  """
  workdir = storage.path(workdir)  # as the trainer sees it: absolute, or a gs:// URL
  out = {}
  for entry in config.data.sources:
    path = str(entry[0]) if isinstance(entry, (tuple, list)) and entry else ""
    if not path.startswith(prepared.SYNTHETIC):
      continue  # folders (and malformed entries, which the trainer reports) as they are
    layout = path[len(prepared.SYNTHETIC):]
    if layout not in synthetic.LAYOUTS:
      raise UserError(f"data source {path!r}: unknown layout; use synthetic:<one of"
                      f" {', '.join(synthetic.LAYOUTS)}>")
    folder = prepared.synthetic_folder(layout, workdir, seed=config.seed,
                                       encoder_size=config.data.encoder_size,
                                       generator_size=config.data.generator_size)
    if jax.process_index() == 0 and not prepared.is_prepared(folder):
      prepare_synthetic(layout, folder, config)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"synthetic {layout}")
    out[path] = folder
  return out
