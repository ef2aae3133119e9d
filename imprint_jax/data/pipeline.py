"""grain input pipelines for the two training stages.

  records (prepared dataset folders, one per source; see `prepared` and `schema`)
    -> per source: global shuffle (re-shuffled every epoch), infinite repeat, decode
       (+ resize to the configured sizes)
    -> mix the sources with the configured weights
    -> random_map: stage-specific augmentation and masks, seeded by grain from (seed,
       position), so every epoch differs and any position can be recomputed
    -> this host's share of each global batch (elements are lazy: a host reads only its own)
    -> batch (per-host batch = global batch / process count) -> normalise to float32
    -> iterator: `read_threads` threads per process, each building whole batches
    -> optional multiprocess workers (`num_workers`), each building whole batches, so a
       batch is the same whatever the number of workers or threads
    -> `feed.Prefetcher`: a background thread assembling global jax.Arrays with the caller's
       batch sharding, whose state is that of the last batch the training loop consumed (what
       a checkpoint must hold).

View datasets (pairs drawn in training) are in `views`.

Batches are dicts of numpy arrays, normalised here (never in the train step):

  stage 1  object (b, E, E, 3) f32 ImageNet-normalised; target (b, G, G, 3) f32 in [-1, 1]
           with its background replaced by OBJECT_FILL; pair_id (b,) i64.
  stage 2  object as above (perturbed: always for 'image' pairs, optionally for video pairs);
           target (b, G, G, 3) f32 in [-1, 1] with background; mask (b, G, G, 1) f32 in {0, 1}
           at a random level; masked_target = target * (1 - mask); mask_level (b,) i32 in 1..4;
           pair_id (b,) i64. With `DataConfig.object_tokens` (precomputed DINOv2 tokens, see
           `imprint_jax.data.token_store`) also object_tokens (b, L, D) f16: one of the
           pair's stored variants at random, each already perturbed; object is then the
           unperturbed object (for sample grids only). With `DataConfig.latents` (precomputed
           VAE posteriors, see `imprint_jax.data.latent_store`) also target_moments and
           masked_target_moments (b, G/f, G/f, 2C) f16 and mask_latent (b, G/f, G/f, 1) f32:
           the mask is then one of the pair's stored masks (level drawn as without), and
           masked_target is built from it.

Records are read as raw bytes with grain's ArrayRecordDataSource and decoded in the map step
(`reader="grain"`, the default), or through TFDS' data source (`reader="tfds"`), which decodes
in the source; both give the same dicts (`prepared.open_source`). The two cost the
same per record (both decode with `FeaturesDict.deserialize_example_np`, PNG via PIL); see
benchmarks/data_throughput.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from absl import flags
import grain
import numpy as np
from PIL import Image

from imprint_jax.data import augment as augment_lib
from imprint_jax.data import latent_store, prepared, records, schema, token_store
from imprint_jax.data import masks as masks_lib
from imprint_jax.data.prepared import READERS, decode_record, open_source
from imprint_jax.data.views import DrawViewPair, view_pairs
from imprint_jax.errors import UserError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the pipelines read and how.

  Attributes:
    sources: (dataset folder, mixing weight) pairs; folders written by `imprint-jax prepare`.
    split: split to read in every source.
    encoder_size: E, side of the object input (records are resized if stored differently).
    generator_size: G, side of the target.
    mask_level_probs: probabilities of mask levels 1 (precise) .. 4 (box), stage 2.
    augment: object perturbation ranges (stage 2).
    augment_video_objects: also perturb the objects of video pairs (image pairs always are).
    num_workers: grain worker processes per host (0 = in the training process).
    prefetch: batches buffered per process (and per worker after it).
    read_threads: threads per process, each making whole batches (0: in the calling thread).
    reader: "grain" (raw ArrayRecord bytes, decoded in the map) or "tfds" (tfds data source).
    object_tokens: stage 2: a folder of precomputed object tokens (`imprint-jax
      encode-objects`) for these sources; "" = none.
    latents: stage 2: a folder of precomputed VAE latents (`imprint-jax encode-latents`) for
      these sources; "" = none.
    window: view datasets (`prepare --pairing views`): a drawn pair (i, j) has
      1 <= |i - j| <= window (frame positions). 7: our choice, the paper's k is lost from our
      copy (docs/paper_fidelity.md).
    draws_per_group: view datasets: visits of each object per epoch, one fresh pair each.
      6: the paper's 1,409,545 MVImgNet pairs over ~219k objects.
    on_corrupt_record: "stop" (one line naming shard and record) or "skip" (use the next
      intact record, logged and counted) when a record fails its checksum (`records`). View
      datasets always stop (another object's record would make a wrong pair).
    seed: seeds the shuffles, the view pairs and the augmentation.
  """
  sources: tuple[tuple[str, float], ...] = ()
  split: str = "train"
  encoder_size: int = 224
  generator_size: int = 512
  mask_level_probs: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)
  augment: augment_lib.AugmentConfig = augment_lib.AugmentConfig()
  augment_video_objects: bool = True
  num_workers: int = 0
  prefetch: int = 2
  read_threads: int = 2
  reader: str = "grain"
  object_tokens: str = ""
  latents: str = ""
  window: int = 7
  draws_per_group: int = 6
  on_corrupt_record: str = "stop"
  seed: int = 0

  def __post_init__(self):
    if self.reader not in READERS:
      raise UserError(f"DataConfig.reader={self.reader!r}: expected one of {READERS}")
    for name in ("encoder_size", "generator_size"):
      if getattr(self, name) <= 0:
        raise UserError(f"DataConfig.{name}={getattr(self, name)}: must be positive")
    if self.on_corrupt_record not in records.ON_CORRUPT:
      raise UserError(f"data.on_corrupt_record={self.on_corrupt_record!r}: expected one of"
                      f" {records.ON_CORRUPT}")
    for name in ("num_workers", "prefetch", "read_threads"):
      if getattr(self, name) < 0:
        raise UserError(f"DataConfig.{name}={getattr(self, name)}: must be >= 0")
    for name in ("window", "draws_per_group"):
      if getattr(self, name) < 1:
        raise UserError(f"data.{name}={getattr(self, name)}: must be >= 1")


# ---------------------------------------------------------------------------------------------
# Reading records (the folder itself is opened by `prepared.open_source`).


def _without_background(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  return np.where(mask > 0, image, np.uint8(schema.OBJECT_FILL)).astype(np.uint8)


def _resize(image: np.ndarray, size: int, is_mask: bool) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
  if is_mask:
    out = np.where(out >= 128, 255, 0).astype(np.uint8)
  return out.reshape(size, size, image.shape[-1])


class DecodeRecord:
  """Source item -> record dict at the configured sizes (picklable for grain workers).

  With `tokens` (a `token_store.TokenSource`), items are (record, token record) pairs and
  the dict gains "object_tokens" (variants, L, D). With `latents` (a
  `latent_store.LatentSource`), items are (item as above, latent record) pairs and the dict
  gains "latents" (`LatentSource.decode`)."""

  def __init__(self, data_dir: str, encoder_size: int, generator_size: int, tokens=None,
               latents=None):
    self.data_dir = data_dir
    self.sizes = {"object": encoder_size, "object_mask": encoder_size,
                  "target": generator_size, "target_mask": generator_size}
    self.tokens = tokens
    self.latents = latents
    self._features = None

  def __getstate__(self):
    return {**self.__dict__, "_features": None}  # rebuilt from features.json in the worker

  def __call__(self, item: Any) -> dict[str, Any]:
    token_item = latent_item = None
    if self.latents is not None:
      item, latent_item = item
    if self.tokens is not None:
      item, token_item = item
    if self._features is None and isinstance(item, (bytes, bytearray, memoryview)):
      self._features = prepared.builder(self.data_dir).info.features
    rec = decode_record(item, self._features)
    if token_item is not None:
      rec["object_tokens"] = self.tokens.decode(token_item, rec["pair_id"])
    if latent_item is not None:
      rec["latents"] = self.latents.decode(latent_item, rec["pair_id"])
    if rec["object"].shape[0] != self.sizes["object"]:
      rec["object"] = _resize(rec["object"], self.sizes["object"], False)
      rec["object_mask"] = _resize(rec["object_mask"], self.sizes["object"], True)
      # Resampling smears colour across the outline: re-segment on the resized mask.
      rec["object"] = _without_background(rec["object"], rec["object_mask"])
    if rec["target"].shape[0] != self.sizes["target"]:
      rec["target"] = _resize(rec["target"], self.sizes["target"], False)
      rec["target_mask"] = _resize(rec["target_mask"], self.sizes["target"], True)
    return rec


def pairs_per_epoch(data_dir: str, split: str, window: int, draws_per_group: int) -> int:
  """Pairs one epoch of `split` holds: the records of a fixed-pair dataset, or objects with an
  allowed pair x draws_per_group for a view dataset."""
  pairs = view_pairs(data_dir, split, window)
  if pairs is not None:
    return len(pairs) * draws_per_group
  return prepared.split_sizes(data_dir).get(split, 0)


# ---------------------------------------------------------------------------------------------
# Per-element transforms (run in grain workers; every draw from grain's per-element rng).


class Stage1Transform:
  """Record -> stage-1 element (uint8; normalised per batch): context-agnostic target."""

  def __call__(self, rec: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    del rng  # multi-view pairs are used as they are
    return {"object": rec["object"],
            "target": _without_background(rec["target"], rec["target_mask"]),
            "pair_id": np.int64(rec["pair_id"])}


class Stage2Transform:
  """Record -> stage-2 element: perturbed object, target, coarse mask at a random level.

  'image' pairs always get the affine and the colour jitter (`AugmentConfig.perturb`): that
  is what makes them pairs. 'video' (and 'multiview') pairs get `DataConfig.augment` when
  `augment_video_objects`; 'test' pairs are never altered.
  """

  def __init__(self, cfg: DataConfig):
    self.augment = cfg.augment
    self.perturb = cfg.augment.perturb()
    self.augment_video_objects = cfg.augment_video_objects
    self.mask_level_probs = tuple(cfg.mask_level_probs)

  def perturb_object(self, rec: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """The record's object as the model sees it (perturbed or not, by its kind)."""
    obj, obj_mask = rec["object"], rec["object_mask"]
    kind = rec["kind"]
    if kind == "image":  # the pair is made here: the object is always perturbed
      obj, _ = augment_lib.augment_object(obj, obj_mask, self.perturb, rng)
    elif kind in ("video", "multiview") and self.augment_video_objects:
      obj, _ = augment_lib.augment_object(obj, obj_mask, self.augment, rng)
    return obj

  def __call__(self, rec: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    out = {}
    try:
      if "object_tokens" in rec:  # perturbed when they were encoded: pick one variant
        tokens = rec["object_tokens"]
        out["object_tokens"] = tokens[rng.integers(tokens.shape[0])]
        obj = rec["object"]
      else:
        obj = self.perturb_object(rec, rng)
      if "latents" in rec:  # the masked background was encoded with stored masks: pick one
        lat = rec["latents"]
        j = latent_store.pick_variant(lat["levels"], self.mask_level_probs, rng)
        level, mask = lat["levels"][j], lat["masks"][j]
        out.update(target_moments=lat["target_moments"],
                   masked_target_moments=lat["masked_target_moments"][j],
                   mask_latent=latent_store.latent_mask(mask, lat["factor"]))
      else:
        level = masks_lib.sample_level(self.mask_level_probs, rng)
        mask = masks_lib.coarse_mask(rec["target_mask"], level, rng)
    except UserError as e:
      raise UserError(f"pair_id {rec['pair_id']} ({rec.get('target_id', '?')}): {e}") from None
    return {"object": obj, "target": rec["target"], "mask": mask.astype(np.uint8),
            "mask_level": np.int32(level), "pair_id": np.int64(rec["pair_id"]), **out}


_OBJECT_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_OBJECT_SHIFT = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalize_object(object_BEE3: np.ndarray) -> np.ndarray:
  """uint8 object images -> float32 normalised with the ImageNet mean/std (DINOv2's input)."""
  x = object_BEE3.astype(np.float32)
  x *= _OBJECT_SCALE  # in place: these arrays are large and this runs for every batch
  x -= _OBJECT_SHIFT
  return x


def normalize_target(target_BGG3: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] (the VAE's input range)."""
  x = target_BGG3.astype(np.float32)
  x *= np.float32(1 / 127.5)
  x -= np.float32(1.0)
  return x


def _finish_stage1(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {"object": normalize_object(batch["object"]),
          "target": normalize_target(batch["target"]),
          "pair_id": batch["pair_id"].astype(np.int64)}


def _finish_stage2(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  target = normalize_target(batch["target"])
  mask = batch["mask"].astype(np.float32)
  out = {"object": normalize_object(batch["object"]), "target": target, "mask": mask,
         "masked_target": target * (np.float32(1.0) - mask),
         "mask_level": batch["mask_level"].astype(np.int32),
         "pair_id": batch["pair_id"].astype(np.int64)}
  for key in ("object_tokens", "target_moments", "masked_target_moments", "mask_latent"):
    if key in batch:
      out[key] = batch[key]
  return out


# ---------------------------------------------------------------------------------------------
# Datasets.


def derive_seed(*parts: int) -> int:
  """A seed derived from integers (a seed and what it is for), the same in every process."""
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def per_host_batch(global_batch: int, process_count: int) -> int:
  """global_batch / process_count, or a UserError if it does not divide."""
  if global_batch <= 0 or global_batch % process_count:
    raise UserError(f"global batch {global_batch} is not a positive multiple of the "
                    f"{process_count} JAX processes; change the batch size")
  return global_batch // process_count


def mixed_records(cfg: DataConfig):
  """The infinite, shuffled, mixed stream of decoded records of ALL hosts (a MapDataset).

  Elements are computed lazily on access, so each host only ever reads the records that
  `_HostSlice` selects for it.
  """
  if not cfg.sources:
    raise UserError("DataConfig.sources is empty: give at least one (dataset folder, weight)")
  parts, weights = [], []
  for i, (data_dir, weight) in enumerate(cfg.sources):
    if not weight > 0:
      raise UserError(f"DataConfig.sources[{i}] ({data_dir}): weight {weight} must be > 0")
    source, _ = open_source(data_dir, cfg.split, cfg.reader)
    pairs = view_pairs(data_dir, cfg.split, cfg.window)
    if pairs is not None:
      if cfg.object_tokens or cfg.latents:
        key = "data.object_tokens" if cfg.object_tokens else "data.latents"
        raise UserError(f"{data_dir}: a view dataset (pairs drawn in training) cannot be read"
                        f" with {key}; prepare it with --pairing pairs")
      if len(pairs) == 0:
        raise UserError(f"{data_dir}: no object of split {cfg.split!r} has two views within"
                        f" data.window={cfg.window}")
      decode = DecodeRecord(data_dir, cfg.encoder_size, cfg.generator_size)
      # Each object visited draws_per_group times per epoch; shuffled anew every epoch.
      ds = grain.MapDataset.range(len(pairs) * cfg.draws_per_group)
      ds = ds.shuffle(seed=derive_seed(cfg.seed, i, 1)).repeat()
      ds = ds.random_map(DrawViewPair(source, pairs, decode), seed=derive_seed(cfg.seed, i, 3))
      parts.append(ds)
      weights.append(float(weight))
      continue
    tokens = None
    if cfg.object_tokens:
      tokens = token_store.TokenSource(cfg.object_tokens, i, data_dir, cfg.split)
      source = tokens.zip(source)
    latents = None
    if cfg.latents:
      latents = latent_store.LatentSource(cfg.latents, i, data_dir, cfg.split)
      source = latents.zip(source)
    ds = grain.MapDataset.source(records.Skipping(source, cfg.on_corrupt_record))
    # Shuffle before repeat: grain folds the epoch into the shuffle seed, so each epoch has
    # its own order.
    ds = ds.shuffle(seed=derive_seed(cfg.seed, i, 1)).repeat()
    ds = ds.map(DecodeRecord(data_dir, cfg.encoder_size, cfg.generator_size, tokens, latents))
    parts.append(ds)
    weights.append(float(weight))
  if len(parts) == 1:
    return parts[0]
  return grain.MapDataset.mix(parts, weights)


class _HostSlice(grain.MapDataset):
  """This host's share of every global batch: elements [p*b, (p+1)*b) of each run of
  `global_batch` consecutive elements of the global stream.

  Global batch g is therefore the same whatever the number of hosts (the concatenation of
  the hosts' batches g), and so is every element's augmentation, which grain seeds by the
  element's position in the global stream: a run on 2 hosts sees exactly the batches of a
  run on 1 host with the same global batch.
  """

  def __init__(self, parent, global_batch: int, per_host: int, process_index: int):
    super().__init__(parent)
    self._global, self._local, self._offset = global_batch, per_host, process_index * per_host
    self._length = (len(parent) // global_batch) * per_host

  def __len__(self) -> int:
    return self._length

  def _global_index(self, index: int) -> int:
    batch, within = divmod(index, self._local)
    return batch * self._global + self._offset + within

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global_index(index)]

  def __str__(self) -> str:
    return f"HostSlice(global={self._global}, local={self._local}, offset={self._offset})"


def _build(cfg: DataConfig, transform, finish, *, global_batch: int, process_index: int,
           process_count: int):
  batch = per_host_batch(global_batch, process_count)
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} not in [0, {process_count})")
  ds = mixed_records(cfg)
  ds = ds.random_map(transform, seed=derive_seed(cfg.seed, 2))
  ds = _HostSlice(ds, global_batch, batch, process_index)
  # Batching the MapDataset (not the iterator) makes a batch the unit of work: batches are
  # the same whatever the number of workers and threads, and one batch never mixes workers.
  ds = ds.batch(batch, drop_remainder=True).map(finish)
  threads = max(0, cfg.read_threads)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(1, cfg.prefetch, threads)))
  if cfg.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.num_workers, per_worker_buffer_size=max(1, cfg.prefetch)))
  return ds


def stage1_dataset(cfg: DataConfig, *, global_batch: int, process_index: int = 0,
                   process_count: int = 1):
  """This host's infinite stage-1 batches: a grain IterDataset; `iter()` it to train.

  Args:
    cfg: what to read.
    global_batch: batch size over all hosts.
    process_index: this JAX process (jax.process_index()).
    process_count: number of JAX processes (jax.process_count()).

  Returns:
    IterDataset of {"object": (b, E, E, 3) f32, "target": (b, G, G, 3) f32, "pair_id": (b,)
    i64}, b = global_batch / process_count. Its iterators have get_state()/set_state().
  """
  return _build(cfg, Stage1Transform(), _finish_stage1, global_batch=global_batch,
                process_index=process_index, process_count=process_count)


def stage2_dataset(cfg: DataConfig, *, global_batch: int, process_index: int = 0,
                   process_count: int = 1):
  """This host's infinite stage-2 batches (see the module docstring for the keys).

  Same arguments and iterator protocol as `stage1_dataset`.
  """
  masks_lib.sample_level(cfg.mask_level_probs, np.random.default_rng(0))  # validate early
  return _build(cfg, Stage2Transform(cfg), _finish_stage2, global_batch=global_batch,
                process_index=process_index, process_count=process_count)

