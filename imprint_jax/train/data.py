"""The trainer's side of the input pipeline: sources, iterators, validation batches, samples.

`data.sources` entries are prepared dataset folders (`imprint-jax prepare` output), or
`synthetic:<layout>` (tiny configs), which the caller of the run prepares first
(`imprint_jax.data_prep.sources.prepare_sources`; the `imprint-jax train` command does) into
`imprint_jax.data.prepared.synthetic_folder(...)`: the trainer only opens prepared folders.
Prepared folders are read with local file reads: a bucket's through a gcsfuse mount
(`imprint_jax.storage`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from imprint_jax import storage
from imprint_jax.data import augment, feed, pipeline, prepared
from imprint_jax.errors import UserError
from imprint_jax.parallel import sharding
from imprint_jax.train import samples
from imprint_jax.train.setup import model_keys


def _source_folder(path: str, c: ml_collections.ConfigDict, workdir) -> str:
  """The prepared folder of a `synthetic:<layout>` source (one line if it is not prepared)."""
  layout = path[len(prepared.SYNTHETIC):]
  folder = prepared.synthetic_folder(layout, workdir, seed=c.seed,
                                     encoder_size=c.data.encoder_size,
                                     generator_size=c.data.generator_size)
  if not prepared.is_prepared(folder):
    raise UserError(f"data source {path!r} is not prepared (expected in {folder}): the run's"
                    " caller prepares synthetic sources (`imprint-jax train` does; in Python"
                    " call imprint_jax.data_prep.sources.prepare_sources(config, workdir)"
                    " first)")
  return str(folder)


def resolve_sources(c: ml_collections.ConfigDict, workdir) -> list[tuple[str, float]]:
  """(prepared dataset folder, weight) per source of `data.sources`."""
  out = []
  for entry in c.data.sources:
    try:
      path, weight = entry
    except (TypeError, ValueError):
      raise UserError(f"data.sources entry {entry!r}: expected (folder, weight)") from None
    if str(path).startswith(prepared.SYNTHETIC):
      path = _source_folder(str(path), c, workdir)
    path = storage.local_path(path, "data source")
    out.append((prepared.require(path), float(weight)))
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
    keys = model_keys(c)
    batch_sharding = sharding.batch_sharding(setup.mesh)

    def transfer(batch):
      device = feed.to_global({k: batch[k] for k in keys}, batch_sharding)
      return device, batch["pair_id"].tolist()

    host = iter(_dataset(c, setup, sources, "train", c.train.global_batch))
    self._prefetcher = feed.Prefetcher(host, size=max(1, c.data.prefetch), transfer=transfer)

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
  if not c.eval_every or c.eval_batches <= 0:
    return []
  if any(prepared.split_sizes(p).get(c.data.val_split, 0) == 0 for p, _ in sources):
    print(f"note: no {c.data.val_split!r} split in every source; validation is off")
    return []
  ds = _dataset(c, setup, sources, c.data.val_split, c.train.global_batch)
  batch_sharding = sharding.batch_sharding(setup.mesh)
  it = iter(ds)
  out = []
  for _ in range(c.eval_batches):
    b = next(it)
    pixels = ("object", "target", "mask", "masked_target") if c.stage == 2 else ("object",)
    keys = dict.fromkeys(pixels + model_keys(c))
    out.append(feed.to_global({k: b[k] for k in keys}, batch_sharding))
  close = getattr(it, "close", None)
  if close:
    close()
  return out


def write_samples(c, setup, state, val_batches, out_dir, step: int):
  """A PNG grid of samples on the first validation batch (process 0 writes it)."""
  if not val_batches:
    return None
  return samples.write_grid(c, setup, state, val_batches[0], out_dir, step)
