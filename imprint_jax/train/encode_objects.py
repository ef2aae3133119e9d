"""`imprint-jax encode-objects`: stage 2's object tokens computed once, before training.

Runs the run's frozen DINOv2 (the one `train` loads: init.checkpoint, then init.encoder_from)
over every pair of every data source of a stage-2 config, in `variants` perturbations of the
object each, sharded over the config's mesh and every host; writes the token folder described
in `imprint_jax.data.token_store`. Train on it with `--set data.object_tokens=FOLDER`.

Each process encodes a contiguous share of every split and writes its own file; the manifest
is written last, by process 0, so an interrupted encoding leaves no folder that `train` reads.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from imprint_jax.data import pipeline, token_store
from imprint_jax.errors import UserError
from imprint_jax.models import layers
from imprint_jax.models.dinov2 import Dinov2
from imprint_jax.train import setup as setup_lib
from imprint_jax.train import sharding

# Relative L2 distance between the probe tokens at encoding time and at training time above
# which `train` refuses the tokens. bfloat16 on another platform moves them by ~1e-2 at most;
# another encoder (e.g. a different stage-1 checkpoint) by ~1.
PROBE_RTOL = 5e-2
_READ_THREADS = 8
_TMP = ".encode"


def _encoder(setup: setup_lib.Setup):
  """jitted (dinov2 state, (B, E, E, 3) pixels) -> (B, L, D) float32 tokens."""
  graphdef = nnx.graphdef(layers.abstract(lambda r: Dinov2(setup.model_cfg.dinov2, rngs=r)))
  return lambda s, x: nnx.merge(graphdef, s)(x).astype(jnp.float32)


def probe_tokens(setup: setup_lib.Setup, dinov2_state: dict | nnx.State) -> np.ndarray:
  """The encoder's (L, D) float32 tokens of `token_store.probe_image` (on every process)."""
  repl = NamedSharding(setup.mesh, P())
  fn = jax.jit(_encoder(setup), out_shardings=repl)
  x = jax.device_put(token_store.probe_image(setup.config.data.encoder_size), repl)
  with jax.set_mesh(setup.mesh), layers.compiling_for(setup.mesh.devices.flat[0].platform):
    return np.asarray(fn(dinov2_state, x))[0]


def check_encoder(setup: setup_lib.Setup, state) -> float:
  """Refuses `data.object_tokens` made by another encoder than the run's (frozen) DINOv2.

  Returns the relative distance of the probe tokens (below PROBE_RTOL)."""
  folder = Path(setup.config.data.object_tokens)
  try:
    want = np.load(folder / token_store.PROBE)
  except (OSError, ValueError) as e:
    raise UserError(f"data.object_tokens {folder}: cannot read {token_store.PROBE} ({e})"
                    ) from None
  got = probe_tokens(setup, state.frozen["dinov2"])
  if got.shape != want.shape:
    raise UserError(f"data.object_tokens {folder}: probe tokens {want.shape}, the run's"
                    f" encoder gives {got.shape}")
  dist = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
  if not dist < PROBE_RTOL:
    raise UserError(f"data.object_tokens {folder} were made by another encoder than this run's"
                    f" DINOv2 (probe tokens differ by {dist:.3g} relative, limit {PROBE_RTOL});"
                    " rerun `imprint-jax encode-objects` with this run's init settings")
  return dist


def _splits(c: ml_collections.ConfigDict, folder: str) -> dict[str, int]:
  from imprint_jax.data_prep import shards
  sizes = shards.split_sizes(folder)
  names = dict.fromkeys(["train", c.data.val_split])
  return {s: sizes[s] for s in names if sizes.get(s, 0) > 0}


def _share(n: int, processes: int, index: int) -> range:
  per = math.ceil(n / processes)
  return range(min(n, index * per), min(n, (index + 1) * per))


def encode(c: ml_collections.ConfigDict, out: str | os.PathLike, *, variants: int = 1,
           batch: int | None = None, workdir: str | os.PathLike | None = None,
           progress: bool = True) -> Path:
  """Encodes the objects of every data source of stage-2 config `c` into folder `out`.

  Args:
    c: a stage-2 run config (its model, init, data and mesh settings are used).
    out: the token folder to create (must not hold a finished encoding).
    variants: perturbations stored per pair (a training step picks one at random).
    batch: images per encoder call over all processes (default: train.global_batch).
    workdir: where the run builds `synthetic:` data sources (the training workdir).
    progress: print one line per split.

  Returns:
    `out`.
  """
  out = Path(out)
  if c.stage != 2:
    raise UserError("encode-objects: the config is not a stage-2 config")
  if (out / token_store.MANIFEST).exists():
    raise UserError(f"--out {out} already holds object tokens; choose a new folder")
  if variants < 1:
    raise UserError(f"--variants {variants}: must be at least 1")
  c = ml_collections.ConfigDict(c.to_dict())
  c.data.object_tokens = ""
  if workdir is None and any(str(p).startswith("synthetic:") for p, _ in c.data.sources):
    raise UserError("the config has synthetic data sources, built in the run's workdir: pass"
                    " --workdir (the one you will train in)")
  from imprint_jax.train import data as train_data
  sources = train_data.resolve_sources(c, Path(workdir or out).absolute())
  setup = setup_lib.build(c, total_steps=1, steps_per_epoch=1)
  if setup.schedules.get("dinov2") is not None:
    raise UserError("encode-objects needs a frozen DINOv2 (components.dinov2 = None)")
  batch = c.train.global_batch if batch is None else batch
  n_proc, proc = jax.process_count(), jax.process_index()
  n_batch = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
  if batch < 1 or batch % (n_batch * n_proc):
    raise UserError(f"--batch {batch}: must be a positive multiple of data x fsdp = {n_batch}"
                    f" and of the {n_proc} processes")
  local = batch // n_proc
  if variants > local:
    raise UserError(f"--variants {variants} exceeds the {local} images per process and call;"
                    " raise --batch")
  per_call = local // variants  # pairs per process and encoder call

  t0 = time.time()
  dinov2_state = setup_lib.init_model(setup)["dinov2"]
  probe = probe_tokens(setup, dinov2_state)
  E = c.data.encoder_size
  batch_sh = sharding.batch_sharding(setup.mesh)
  encoder = jax.jit(_encoder(setup), out_shardings=batch_sh)
  data_cfg = train_data.data_config(c, sources, "train")
  transform = pipeline.Stage2Transform(data_cfg)
  platform = setup.mesh.devices.flat[0].platform

  def tokens_of(images: np.ndarray) -> np.ndarray:
    x = jax.make_array_from_process_local_data(batch_sh, images)
    with jax.set_mesh(setup.mesh), layers.compiling_for(platform):
      y = encoder(dinov2_state, x)
    if n_proc == 1:
      return np.asarray(y)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        y, setup.mesh, P(sharding.BATCH_AXES)))

  out.mkdir(parents=True, exist_ok=True)
  entries = []
  pool = concurrent.futures.ThreadPoolExecutor(_READ_THREADS)
  try:
    for i, (folder, _) in enumerate(sources):
      splits = _splits(c, folder)
      entries.append({"path": str(Path(folder).absolute()), "splits": splits})
      for split, n in splits.items():
        source, _ = pipeline.open_source(folder, split, "grain")
        decode = pipeline.DecodeRecord(folder, E, c.data.generator_size)
        mine = _share(n, n_proc, proc)
        calls = math.ceil(math.ceil(n / n_proc) / per_call)  # the same on every process

        def objects(index: int, i=i, source=source, decode=decode):
          rec = decode(source[index])
          objs = [transform.perturb_object(
              rec, np.random.default_rng(pipeline.derive_seed(c.seed, 3, i, index, k)))
              for k in range(variants)]
          return int(rec["pair_id"]), np.stack(objs)

        def payloads(mine=mine, calls=calls, objects=objects):
          for call in range(calls):
            indices = mine[call * per_call:(call + 1) * per_call]
            recs = list(pool.map(objects, indices))
            images = np.zeros((local, E, E, 3), np.float32)
            if recs:
              images[:len(recs) * variants] = pipeline.normalize_object(
                  np.concatenate([o for _, o in recs]))
            tokens = tokens_of(images).astype(token_store.DTYPE)
            if not np.isfinite(tokens[:len(recs) * variants]).all():
              raise UserError(f"{folder} ({split}): object tokens overflow float16")
            for j, (pair_id, _) in enumerate(recs):
              yield token_store.encode_record(pair_id, tokens[j * variants:(j + 1) * variants])

        from imprint_jax.data_prep import shards
        path = token_store.source_dir(out, i) / token_store.shard_name(split, proc, n_proc)
        path.parent.mkdir(parents=True, exist_ok=True)
        count, size = shards.write_array_record(path, payloads(), tmp_dir=out / _TMP)
        if progress and proc == 0:
          print(f"source {i} {split}: {count} pairs x {variants} variants on this process,"
                f" {size / 2**20:.1f} MiB, {time.time() - t0:.0f} s")
  finally:
    pool.shutdown()
  if n_proc > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("encode-objects written")
  if proc == 0:
    tmp = out / _TMP / token_store.PROBE
    tmp.parent.mkdir(exist_ok=True)
    np.save(tmp, probe)
    tmp.replace(out / token_store.PROBE)
    token_store.write_manifest(
        out, encoder_size=E, variants=variants, tokens=int(probe.shape[0]),
        width=int(probe.shape[1]), seed=int(c.seed),
        augment_video_objects=bool(c.data.augment_video_objects),
        init={"checkpoint": c.init.checkpoint, "encoder_from": c.init.encoder_from},
        sources=entries)
    shutil.rmtree(out / _TMP, ignore_errors=True)
  return out
