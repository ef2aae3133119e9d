"""The trainer's side of the input pipeline: sources, iterators, validation batches, samples.

`data.sources` entries are prepared dataset folders (`imprint-jax prepare` output), or
`synthetic:<layout>` (tiny configs): a small synthetic dataset in that published layout is
generated and prepared into `<workdir>/data/<layout>` on first use, so a tiny run needs no
data on disk (with a gs:// workdir: into a local folder named after the settings that shape it).
Prepared folders are read with local file reads: a bucket's through a gcsfuse mount
(`imprint_jax.storage`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_collections

from imprint_jax import storage
from imprint_jax.data import augment, pipeline
from imprint_jax.errors import UserError

SYNTHETIC = "synthetic:"


def _prepare_synthetic(layout: str, out: Path, c: ml_collections.ConfigDict) -> None:
  from imprint_jax.data_prep import prepare, synthetic
  raw = out.parent / f".raw_{layout}"
  synthetic.generate(raw, synthetic.SyntheticConfig(groups=8, frames=6, seed=c.seed),
                     layouts=(layout,))
  cfg = prepare.PrepareConfig(encoder_size=c.data.encoder_size,
                              generator_size=c.data.generator_size, min_size=16,
                              val_fraction=0.25, seed=c.seed)
  prepare.prepare(layout, raw / layout, out, cfg, split="all", workers=1, progress=False)


def _synthetic_folder(c: ml_collections.ConfigDict, workdir, layout: str) -> Path:
  if not storage.is_remote(workdir):
    return Path(os.fspath(workdir)) / "data" / layout
  # Generated data cannot be prepared into a bucket (prepare writes local files): a local
  # folder per setting that shapes it, so a resumed run finds the same pairs.
  name = f"{layout}-seed{c.seed}-e{c.data.encoder_size}-g{c.data.generator_size}"
  return Path(tempfile.gettempdir()) / "imprint-jax-synthetic" / name


def resolve_sources(c: ml_collections.ConfigDict, workdir) -> list[tuple[str, float]]:
  """(dataset folder, weight) per source; synthetic sources are built on first use."""
  out = []
  for entry in c.data.sources:
    try:
      path, weight = entry
    except (TypeError, ValueError):
      raise UserError(f"data.sources entry {entry!r}: expected (folder, weight)") from None
    if str(path).startswith(SYNTHETIC):
      layout = str(path)[len(SYNTHETIC):]
      folder = _synthetic_folder(c, workdir, layout)
      if jax.process_index() == 0 and not (folder / "dataset_info.json").exists():
        _prepare_synthetic(layout, folder, c)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"synthetic {layout}")
      path = str(folder)
    path = storage.local_path(path, "data source")
    if not (Path(path) / "dataset_info.json").is_file():
      raise UserError(f"data source {path}: not a prepared dataset (no dataset_info.json);"
                      " run `imprint-jax prepare` first")
    out.append((str(path), float(weight)))
  if not out:
    raise UserError("data.sources is empty")
  if c.data.get("lut_dir", ""):
    augment.load_lut_dir(str(c.data.lut_dir))  # a bad LUT folder fails before compiling
  return out


def num_pairs(sources: list[tuple[str, float]], split: str,
              c: ml_collections.ConfigDict | None = None) -> int:
  """Pairs per epoch of `split` over all sources (view datasets: objects x draws)."""
  window, draws = _pairing(c)
  return sum(pipeline.pairs_per_epoch(path, split, window, draws) for path, _ in sources)


def steps_per_epoch(sources: list[tuple[str, float]], global_batch: int,
                    c: ml_collections.ConfigDict | None = None) -> int:
  return num_pairs(sources, "train", c) // global_batch


def _pairing(c: ml_collections.ConfigDict | None) -> tuple[int, int]:
  """(data.window, data.draws_per_group), the pipeline's defaults where the config has none."""
  d = pipeline.DataConfig()
  data = c.data if c is not None else {}
  return int(data.get("window", d.window)), int(data.get("draws_per_group", d.draws_per_group))


def data_config(c: ml_collections.ConfigDict, sources, split: str) -> pipeline.DataConfig:
  kw: dict[str, Any] = {}
  if c.stage == 2:
    kw = dict(augment=augment.AugmentConfig(lut_dir=str(c.data.get("lut_dir", ""))),
              mask_level_probs=tuple(c.data.mask_level_probs),
              augment_video_objects=bool(c.data.augment_video_objects),
              object_tokens=str(c.data.get("object_tokens", "")),
              latents=str(c.data.get("latents", "")))
  window, draws = _pairing(c)
  return pipeline.DataConfig(sources=tuple(sources), split=split, window=window,
                             draws_per_group=draws,
                             encoder_size=c.data.encoder_size,
                             generator_size=c.data.generator_size,
                             num_workers=c.data.num_workers if split == "train" else 0,
                             prefetch=c.data.prefetch, seed=c.seed,
                             on_corrupt_record=str(c.data.get("on_corrupt_record", "stop")),
                             **kw)


def _dataset(c, setup, sources, split: str, global_batch: int):
  build = pipeline.stage1_dataset if setup.stage == 1 else pipeline.stage2_dataset
  return build(data_config(c, sources, split), global_batch=global_batch,
               process_index=jax.process_index(), process_count=jax.process_count())


class TrainIterator:
  """Yields (global device batch of the step's keys, this host's pair ids); checkpointable."""

  def __init__(self, c, setup, sources):
    from imprint_jax.train.setup import model_keys
    keys = model_keys(c)
    mesh = setup.mesh

    def transfer(batch):
      device = pipeline.to_global({k: batch[k] for k in keys}, mesh)
      return device, batch["pair_id"].tolist()

    host = iter(_dataset(c, setup, sources, "train", c.train.global_batch))
    self._prefetcher = pipeline.Prefetcher(host, size=max(1, c.data.prefetch),
                                           transfer=transfer)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._prefetcher)

  def get_state(self) -> dict[str, Any]:
    return self._prefetcher.get_state()

  def set_state(self, state) -> None:
    self._prefetcher.set_state(state)

  def close(self) -> None:
    self._prefetcher.close()


def train_iterator(c, setup, sources) -> TrainIterator:
  return TrainIterator(c, setup, sources)


def val_batches(c, setup, sources) -> list[dict[str, jax.Array]]:
  """The fixed validation set: the first `eval_batches` batches of the val split (global
  device arrays), or [] when a source has no val split. They also hold the pixels that sample
  grids use (object; stage 2: target, mask, masked_target) when the step reads precomputed
  tokens or latents instead."""
  from imprint_jax.data_prep import shards
  from imprint_jax.train.setup import model_keys
  if not c.eval_every or c.eval_batches <= 0:
    return []
  if any(shards.split_sizes(p).get(c.data.val_split, 0) == 0 for p, _ in sources):
    print(f"note: no {c.data.val_split!r} split in every source; validation is off")
    return []
  ds = _dataset(c, setup, sources, c.data.val_split, c.train.global_batch)
  it = iter(ds)
  out = []
  for _ in range(c.eval_batches):
    b = next(it)
    pixels = ("object", "target", "mask", "masked_target") if c.stage == 2 else ("object",)
    keys = dict.fromkeys(pixels + model_keys(c))
    out.append(pipeline.to_global({k: b[k] for k in keys}, setup.mesh))
  close = getattr(it, "close", None)
  if close:
    close()
  return out


def write_samples(c, setup, state, val_batches, out_dir, step: int):
  """A PNG grid of samples on the first validation batch (process 0 writes it)."""
  if not val_batches:
    return None
  from imprint_jax.train import samples
  return samples.write_grid(c, setup, state, val_batches[0], out_dir, step)
