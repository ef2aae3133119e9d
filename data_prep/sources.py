"""`synthetic:<layout>` data sources of a run config -> prepared dataset folders.

Tiny configs (`configs/stage*.py:tiny`) train on `synthetic:<layout>` sources, so that a run
needs no data on disk. The trainer only opens prepared folders; whoever starts a run prepares
these first (the `imprint-jax train`, `encode-objects` and `encode-latents` commands, on every
host with process 0 building and a barrier; tests):

  from imprint_jax.data_prep import sources
  sources.prepare_sources(config, workdir)    # then train.loop.train(config, workdir)

Each becomes a small synthetic dataset in that published layout (`synthetic.generate`),
prepared (`prepare.prepare`) into `imprint_jax.data.prepared.synthetic_folder(...)`, once:
a folder already prepared is kept. The config itself is unchanged (it still names
`synthetic:<layout>`, and the trainer finds the folder by the same rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import ml_collections

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


def prepare_sources(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                    main_process: bool = True,
                    barrier: Callable[[str], None] | None = None) -> dict[str, Path]:
  """Prepares the config's `synthetic:<layout>` sources for a run in `workdir`.

  Args:
    config: the run config (data.sources, data.encoder_size/generator_size, seed).
    workdir: the run's workdir (local, or gs:// for which a local folder is used).
    main_process: whether this process builds what is missing. With several JAX processes,
      call it on every process with jax.process_index() == 0 here and
    barrier: e.g. jax.experimental.multihost_utils.sync_global_devices, called with a name
      after each source, so that no process reads a source before it is complete (JAX stays
      the caller's: data preparation needs no devices).

  Returns:
    {source: prepared folder} for the synthetic sources.
  """
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
    if main_process and not prepared.is_prepared(folder):
      prepare_synthetic(layout, folder, config)
    if barrier is not None:
      barrier(f"synthetic {layout}")
    out[path] = folder
  return out
