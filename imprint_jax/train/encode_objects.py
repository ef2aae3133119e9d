"""`imprint-jax encode-objects` and `encode-latents`: stage 2's frozen encoders run once,
before training.

encode-objects runs the run's frozen DINOv2 (the one `train` loads: init.checkpoint, then
init.encoder_from) over the object of every pair of every data source of a stage-2 config, in
`variants` perturbations each, and writes the token folder described in
`imprint_jax.data.token_store`; train on it with `--set data.object_tokens=FOLDER`.
encode-latents runs the run's frozen VAE encoder over every pair's target and its masked
backgrounds and writes the posteriors as described in `imprint_jax.data.latent_store`; train
on them with `--set data.latents=FOLDER`. Both can be used together.

Both shard the encoder over the config's mesh and every host. Each process encodes a
contiguous share of every split and writes its own file; the manifest is written last, by
process 0, so an interrupted encoding leaves no folder that `train` reads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from imprint_jax import storage
from imprint_jax.data import latent_store, pipeline, prepared, records, token_store
from imprint_jax.data import masks as masks_lib
from imprint_jax.errors import UserError
from imprint_jax.models import layers
from imprint_jax.parallel import compiler
from imprint_jax.models.dinov2 import Dinov2
from imprint_jax.models.vae import AutoencoderKL
from imprint_jax.parallel import sharding
from imprint_jax.train import data as train_data
from imprint_jax.train import setup as setup_lib

# Relative L2 distance between the probe outputs at encoding time and at training time above
# which `train` refuses a store. bfloat16 on another platform moves them by ~1e-2 at most;
# another encoder (e.g. a different stage-1 checkpoint or VAE) by ~1.
PROBE_RTOL = 5e-2
_READ_THREADS = 8
_TMP = ".encode"


def _encoder(setup: setup_lib.Setup):
  """jitted (dinov2 state, (B, E, E, 3) pixels) -> (B, L, D) float32 tokens."""
  graphdef = nnx.graphdef(layers.abstract(lambda r: Dinov2(setup.model_cfg.dinov2, rngs=r)))
  return lambda s, x: nnx.merge(graphdef, s)(x).astype(jnp.float32)


def _vae_encoder(setup: setup_lib.Setup):
  """(vae state, (B, G, G, 3) images in [-1, 1]) -> (B, G/f, G/f, 2C) float32 [mean, logvar]."""
  graphdef = nnx.graphdef(layers.abstract(lambda r: AutoencoderKL(setup.model_cfg.vae,
                                                                  rngs=r)))
  return lambda s, x: jnp.concatenate(nnx.merge(graphdef, s).encode(x), axis=-1)


def _probe(setup: setup_lib.Setup, fn, state, image: np.ndarray) -> np.ndarray:
  """fn(state, image)[0] as float32 numpy, replicated (on every process)."""
  repl = NamedSharding(setup.mesh, P())
  x = jax.device_put(image, repl)
  with jax.set_mesh(setup.mesh), compiler.compiling_for(setup.mesh.devices.flat[0].platform):
    return np.asarray(jax.jit(fn, out_shardings=repl)(state, x))[0]


def probe_tokens(setup: setup_lib.Setup, dinov2_state: dict | nnx.State) -> np.ndarray:
  """The encoder's (L, D) float32 tokens of `token_store.probe_image` (on every process)."""
  return _probe(setup, _encoder(setup), dinov2_state,
                token_store.probe_image(setup.config.data.encoder_size))


def probe_moments(setup: setup_lib.Setup, vae_state: dict | nnx.State) -> np.ndarray:
  """The VAE's (h, w, 2C) float32 moments of `latent_store.probe_image` (on every process)."""
  return _probe(setup, _vae_encoder(setup), vae_state,
                latent_store.probe_image(setup.config.data.generator_size))


def _check_probe(key: str, folder: Path, want_file: str, got: np.ndarray, what: str,
                 command: str, how: str) -> float:
  try:
    want = np.load(folder / want_file)
  except (OSError, ValueError) as e:
    raise UserError(f"{key} {folder}: cannot read {want_file} ({e})") from None
  if got.shape != want.shape:
    raise UserError(f"{key} {folder}: probe {want.shape}, the run's {what} gives {got.shape}")
  dist = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
  if not dist < PROBE_RTOL:
    raise UserError(f"{key} {folder} were made by another encoder than this run's {what}"
                    f" (probe outputs differ by {dist:.3g} relative, limit {PROBE_RTOL});"
                    f" rerun `imprint-jax {command}` with {how}")
  return dist


def check_encoder(setup: setup_lib.Setup, state) -> float:
  """Refuses `data.object_tokens` made by another encoder than the run's (frozen) DINOv2.

  Returns the relative distance of the probe tokens (below PROBE_RTOL)."""
  return _check_probe("data.object_tokens", Path(storage.local_path(setup.config.data.object_tokens,
                                                           "data.object_tokens")),
                      token_store.PROBE, probe_tokens(setup, state.frozen["dinov2"]), "DINOv2",
                      "encode-objects", "this run's init settings")


def check_vae(setup: setup_lib.Setup, state) -> float:
  """Refuses `data.latents` made by another VAE than the run's.

  Returns the relative distance of the probe moments (below PROBE_RTOL)."""
  folder = Path(storage.local_path(setup.config.data.latents, latent_store.KEY))
  return _check_probe(latent_store.KEY, folder, token_store.PROBE,
                      probe_moments(setup, state.frozen["vae"]), "VAE",
                      latent_store.COMMAND, "this run's init.checkpoint")


def _splits(c: ml_collections.ConfigDict, folder: str) -> dict[str, int]:
  sizes = prepared.split_sizes(folder)
  names = dict.fromkeys(["train", c.data.val_split])
  return {s: sizes[s] for s in names if sizes.get(s, 0) > 0}


def _share(n: int, processes: int, index: int) -> range:
  per = math.ceil(n / processes)
  return range(min(n, index * per), min(n, (index + 1) * per))


def _check_stage2(c: ml_collections.ConfigDict, command: str) -> None:
  if c.stage != 2:
    raise UserError(f"{command}: the config is not a stage-2 config")


class _Store:
  """A store being written: the run it encodes for and how its encoder calls are laid out."""

  def __init__(self, c: ml_collections.ConfigDict, out: str | os.PathLike, *, command: str,
               what: str, key: str, per_pair: int, batch: int | None,
               workdir: str | os.PathLike | None, per_pair_option: str,
               needs_dinov2: bool = True):
    # Token and latent shards are ArrayRecord files, written and read with local file I/O.
    # An --out on gs:// is written to a local staging folder and uploaded (each process its
    # own shards, then process 0 the probe and, last, the manifest); training reads it back
    # through a gcsfuse mount (imprint_jax.storage).
    _check_stage2(c, command)
    self.remote = storage.path(out) if storage.is_remote(out) else None
    if self.remote is not None:
      if (self.remote / token_store.MANIFEST).exists():
        raise UserError(f"--out {out} already holds {what}; choose a new folder")
      out = Path(tempfile.mkdtemp(prefix="imprint-store-"))
    else:
      out = Path(storage.local_path(out, f"{command} --out"))
      if (out / token_store.MANIFEST).exists():
        raise UserError(f"--out {out} already holds {what}; choose a new folder")
    self.out = out
    c = ml_collections.ConfigDict(c.to_dict())
    c.data[key.split(".")[1]] = ""  # the store being written is not read
    if not needs_dinov2:  # e.g. the VAE's store: the stage-1 encoder is not loaded
      c.init.encoder_from = ""
      c.allow_random_encoder = True
    if workdir is None and any(str(p).startswith(prepared.SYNTHETIC) for p, _ in c.data.sources):
      raise UserError("the config has synthetic data sources, prepared in the run's workdir:"
                      " pass --workdir (the one you will train in)")
    self.c = c
    self.setup = setup = setup_lib.build(c, total_steps=1, steps_per_epoch=1)
    batch = c.train.global_batch if batch is None else batch
    self.n_proc, self.proc = jax.process_count(), jax.process_index()
    n_batch = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    if batch < 1 or batch % (n_batch * self.n_proc):
      raise UserError(f"--batch {batch}: must be a positive multiple of data x fsdp = {n_batch}"
                      f" and of the {self.n_proc} processes")
    self.local = batch // self.n_proc
    if per_pair > self.local:
      raise UserError(f"{per_pair_option} needs {per_pair} images per pair, more than the"
                      f" {self.local} per process and call; raise --batch")
    self.per_pair = per_pair
    self.batch_sharding = sharding.batch_sharding(setup.mesh)
    self.sources = train_data.resolve_sources(
        c, storage.path(workdir) if workdir else out.absolute())

  def gather(self, y: jax.Array) -> np.ndarray:
    """A batch-sharded global array -> this process's rows."""
    if self.n_proc == 1:
      return np.asarray(y)
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        y, self.setup.mesh, P(sharding.BATCH_AXES)))

  def write(self, fn: Callable, state: Any, inputs: Callable, record: Callable, *,
            image_shape: tuple[int, ...], progress: bool, what: str) -> list[dict[str, Any]]:
    """Encodes every pair of every source's train and validation splits into record files.

    Args:
      fn: (state, (local, *image_shape) float32 batch) -> (local, ...) float32 outputs.
      inputs: (record dict, source index, record index) -> (per_pair images, aux).
      record: (pair_id, (per_pair, ...) float32 outputs, aux) -> record bytes.

    Returns:
      The manifest's per-source entries.
    """
    c, setup, out = self.c, self.setup, self.out
    per_call = self.local // self.per_pair  # pairs per process and encoder call
    encoder = jax.jit(fn, out_shardings=self.batch_sharding)
    platform = setup.mesh.devices.flat[0].platform

    def run(images: np.ndarray) -> np.ndarray:
      x = jax.make_array_from_process_local_data(self.batch_sharding, images)
      with jax.set_mesh(setup.mesh), compiler.compiling_for(platform):
        return self.gather(encoder(state, x))

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS)
    try:
      for i, (folder, _) in enumerate(self.sources):
        splits = _splits(c, folder)
        entries.append({"path": str(Path(folder).absolute()), "splits": splits})
        for split, n in splits.items():
          source, _ = pipeline.open_source(folder, split, "grain")
          decode = pipeline.DecodeRecord(folder, c.data.encoder_size, c.data.generator_size)
          mine = _share(n, self.n_proc, self.proc)
          calls = math.ceil(math.ceil(n / self.n_proc) / per_call)  # same on every process

          def pair(index: int, i=i, source=source, decode=decode):
            rec = decode(source[index])
            return (int(rec["pair_id"]), *inputs(rec, i, index))

          def payloads(mine=mine, calls=calls, pair=pair, folder=folder, split=split):
            for call in range(calls):
              pairs = list(pool.map(pair, mine[call * per_call:(call + 1) * per_call]))
              images = np.zeros((self.local, *image_shape), np.float32)
              for j, (_, x, _) in enumerate(pairs):
                images[j * self.per_pair:(j + 1) * self.per_pair] = x
              y = run(images)
              if not np.isfinite(y[:len(pairs) * self.per_pair].astype(np.float16)).all():
                raise UserError(f"{folder} ({split}): {what} overflow float16")
              for j, (pair_id, _, aux) in enumerate(pairs):
                yield record(pair_id, y[j * self.per_pair:(j + 1) * self.per_pair], aux)

          path = token_store.source_dir(out, i) / token_store.shard_name(split, self.proc,
                                                                         self.n_proc)
          path.parent.mkdir(parents=True, exist_ok=True)
          count, size = records.write_array_record(path, payloads(), tmp_dir=out / _TMP)
          if progress and self.proc == 0:
            print(f"source {i} {split}: {count} pairs x {self.per_pair} images on this"
                  f" process, {size / 2**20:.1f} MiB, {time.time() - t0:.0f} s")
    finally:
      pool.shutdown()
    self._upload(exclude=(token_store.PROBE, token_store.MANIFEST))
    if self.n_proc > 1:
      multihost_utils.sync_global_devices(f"{what} written")
    return entries

  def _upload(self, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """Copies this process's finished files of the staging folder to the gs:// --out."""
    if self.remote is None:
      return
    for f in sorted(self.out.rglob("*")):
      rel = f.relative_to(self.out)
      if (not f.is_file() or rel.parts[0] == _TMP or rel.as_posix() in exclude
          or (only is not None and rel.as_posix() not in only)):
        continue
      dst = self.remote / rel.as_posix()
      dst.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(f).copy(dst, overwrite=True)

  def finish(self, probe: np.ndarray, write_manifest: Callable[[Path], Any]
             ) -> Path | epath.Path:
    """Process 0 writes the probe, then the manifest (the store's last file): given the
    folder to write it in. Returns the store's folder (--out)."""
    if self.proc == 0:
      tmp = self.out / _TMP / token_store.PROBE
      tmp.parent.mkdir(exist_ok=True)
      np.save(tmp, probe)
      tmp.replace(self.out / token_store.PROBE)
      write_manifest(self.out)
      shutil.rmtree(self.out / _TMP, ignore_errors=True)
      self._upload(only=(token_store.PROBE,))
      self._upload(only=(token_store.MANIFEST,))
    if self.remote is None:
      return self.out
    shutil.rmtree(self.out, ignore_errors=True)
    return self.remote


def encode(c: ml_collections.ConfigDict, out: str | os.PathLike, *, variants: int = 1,
           batch: int | None = None, workdir: str | os.PathLike | None = None,
           progress: bool = True) -> Path:
  """Encodes the objects of every data source of stage-2 config `c` into folder `out`.

  Args:
    c: a stage-2 run config (its model, init, data and mesh settings are used).
    out: the token folder to create (must not hold a finished encoding).
    variants: perturbations stored per pair (a training step picks one at random).
    batch: images per encoder call over all processes (default: train.global_batch).
    workdir: the training workdir, where `synthetic:` data sources are prepared.
    progress: print one line per split.

  Returns:
    `out`.
  """
  if variants < 1:
    raise UserError(f"--variants {variants}: must be at least 1")
  store = _Store(c, out, command="encode-objects", what="object tokens",
                 key="data.object_tokens", per_pair=variants, batch=batch,
                 workdir=workdir, per_pair_option=f"--variants {variants}")
  c, setup = store.c, store.setup
  if setup.schedules.get("dinov2") is not None:
    raise UserError("encode-objects needs a frozen DINOv2 (components.dinov2 = None)")
  dinov2_state = setup_lib.init_model(setup)["dinov2"]
  probe = probe_tokens(setup, dinov2_state)
  E = c.data.encoder_size
  transform = pipeline.Stage2Transform(train_data.data_config(c, store.sources, "train"))

  def inputs(rec, i, index):
    objs = [transform.perturb_object(
        rec, np.random.default_rng(pipeline.derive_seed(c.seed, 3, i, index, k)))
        for k in range(variants)]
    return pipeline.normalize_object(np.stack(objs)), None

  entries = store.write(_encoder(setup), dinov2_state, inputs,
                        lambda pair_id, y, _: token_store.encode_record(pair_id, y),
                        image_shape=(E, E, 3), progress=progress, what="object tokens")
  return store.finish(probe, lambda folder: token_store.write_manifest(
      folder, encoder_size=E, variants=variants, tokens=int(probe.shape[0]),
      width=int(probe.shape[1]), seed=int(c.seed),
      augment_video_objects=bool(c.data.augment_video_objects),
      init={"checkpoint": c.init.checkpoint, "encoder_from": c.init.encoder_from},
      sources=entries))


def encode_latents(c: ml_collections.ConfigDict, out: str | os.PathLike, *, mask_draws: int = 2,
                   batch: int | None = None, workdir: str | os.PathLike | None = None,
                   progress: bool = True) -> Path:
  """Encodes the targets and masked backgrounds of every pair of every data source of stage-2
  config `c` with its frozen VAE into folder `out` (`imprint_jax.data.latent_store`).

  Args:
    c: a stage-2 run config (its model, init.checkpoint, data and mesh settings are used;
      init.encoder_from is not needed; the mask levels stored are those with a positive
      data.mask_level_probs).
    out: the latent folder to create (must not hold a finished encoding).
    mask_draws: masks stored per pair at levels 2 and 3 (1 and 4 have no random draws).
    batch: images per encoder call over all processes (default: train.global_batch); each
      pair takes 1 + (number of stored masks) images.
    workdir: the training workdir, where `synthetic:` data sources are prepared.
    progress: print one line per split.

  Returns:
    `out`.
  """
  _check_stage2(c, latent_store.COMMAND)
  if mask_draws < 1:
    raise UserError(f"--mask-draws {mask_draws}: must be at least 1")
  levels = latent_store.variant_levels(tuple(c.data.mask_level_probs), mask_draws)
  store = _Store(c, out, command=latent_store.COMMAND, what="latents", key=latent_store.KEY,
                 per_pair=1 + len(levels), batch=batch, workdir=workdir,
                 per_pair_option=f"--mask-draws {mask_draws}", needs_dinov2=False)
  c, setup = store.c, store.setup
  vae_state = setup_lib.init_model(setup)["vae"]
  probe = probe_moments(setup, vae_state)
  G = c.data.generator_size

  def inputs(rec, i, index):
    target = pipeline.normalize_target(rec["target"][None])
    masks = np.stack([masks_lib.coarse_mask(
        rec["target_mask"], level,
        np.random.default_rng(pipeline.derive_seed(c.seed, 4, i, index, k)))
        for k, level in enumerate(levels)]).astype(np.float32)
    # As the pixel pipeline builds it (`pipeline._finish_stage2`).
    background = target * (np.float32(1.0) - masks)
    return np.concatenate([target, background]), masks

  def record(pair_id, y, masks):
    return latent_store.encode_record(pair_id, y[0], y[1:], masks)

  entries = store.write(_vae_encoder(setup), vae_state, inputs, record, image_shape=(G, G, 3),
                        progress=progress, what="latents")
  return store.finish(probe, lambda folder: latent_store.write_manifest(
      folder, generator_size=G, latent=tuple(int(x) for x in probe.shape), levels=levels,
      mask_draws=mask_draws, mask_level_probs=[float(p) for p in c.data.mask_level_probs],
      seed=int(c.seed), vae=dataclasses.asdict(setup.model_cfg.vae),
      init={"checkpoint": c.init.checkpoint}, sources=entries))
