"""Orbax checkpoints of the whole model, shared by import, training, compositing and export.

A checkpoint is a folder with the orbax items
  model/      the parameters of `Imprint` (dinov2, adapter, unet, vae) as a nested dict
  meta/       JSON: {"model": ImprintConfig.to_dict(), "stage": 0|1|2, "step": ..., ...}
  opt_state/  (training checkpoints only) the optimizer state
`imprint-jax import` writes one such folder; training writes `<workdir>/checkpoints/<step>/`
through an orbax CheckpointManager. `resolve()` accepts either, or a training workdir (its best
checkpoint by validation loss if one was recorded, else its latest).
Every checkpoint also holds `checksums.json` (see `imprint_jax.integrity`), verified before
its parameters are restored: a corrupt checkpoint is refused with one line naming the file.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from imprint_jax import integrity
from imprint_jax.errors import UserError
from imprint_jax.models.imprint import Imprint, ImprintConfig
from imprint_jax.models import layers

CHECKPOINTS_DIR = "checkpoints"

log = logging.getLogger("imprint_jax")


def abstract_arrays(state: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings, if given) for every array leaf of a state."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def is_checkpoint(path: Path) -> bool:
  return (path / "model").is_dir() and (path / "meta").is_dir()


def _latest_step_dir(root: Path) -> Path | None:
  steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit() and is_checkpoint(p))
  return steps[-1][1] if steps else None


def _best_step_dir(root: Path) -> Path | None:
  best = None
  for p in root.iterdir():
    if not (p.name.isdigit() and is_checkpoint(p)):
      continue
    metrics = p / "metrics" / "metrics"
    if metrics.is_file():
      try:
        val = json.loads(metrics.read_text()).get("val_loss")
      except ValueError:
        val = None
      if val is not None and (best is None or val < best[0]):
        best = (val, p)
  return None if best is None else best[1]


def resolve(path: str | Path, which: str = "best") -> Path:
  """The checkpoint folder that `path` designates (see module docstring); UserError if none."""
  path = Path(path)
  if not path.exists():
    raise UserError(f"{path}: no such checkpoint or workdir")
  # Absolute: orbax refuses relative paths ("Checkpoint path should be absolute").
  if is_checkpoint(path):
    return path.absolute()
  for root in (path / CHECKPOINTS_DIR, path):
    if root.is_dir():
      found = (_best_step_dir(root) if which == "best" else None) or _latest_step_dir(root)
      if found is not None:
        return found.absolute()
  raise UserError(f"{path}: not an imprint-jax checkpoint (no model/ and meta/ inside, and no"
                  f" {CHECKPOINTS_DIR}/<step>/ holding them)")


def read_meta(ckpt: Path) -> dict[str, Any]:
  ckpt = resolve(ckpt)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
    try:
      return ck.restore(ckpt, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except (FileNotFoundError, ValueError) as e:
      raise UserError(f"{ckpt}: unreadable checkpoint metadata ({e})") from None


def save_model(path: str | Path, model: Imprint, meta: dict[str, Any]) -> Path:
  """Writes `model` (all parameters) and `meta` + the model config as a checkpoint folder.
  Orbax writes to a temporary name and renames, so a failed save leaves nothing behind."""
  path = Path(path).absolute()
  if path.exists():
    raise UserError(f"{path}: already exists; choose a new --out")
  meta = dict(meta, model=model.cfg.to_dict())
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
    ck.save(path, args=ocp.args.Composite(model=ocp.args.StandardSave(pure),
                                          meta=ocp.args.JsonSave(meta)))
  _write_checksums(path)
  return path


def _write_checksums(path: Path) -> None:
  """The checksums of a fresh `save_model` folder; on failure the folder goes too."""
  if jax.process_index() != 0:
    return
  try:
    integrity.write(path)
  except OSError as e:
    shutil.rmtree(path, ignore_errors=True)
    raise UserError(f"{path}: writing its checksums failed ({e}); nothing was kept") from None


def verify(ckpt: Path) -> None:
  """Checks the checkpoint's files against its checksums (CorruptCheckpoint, one line, if
  they differ); warns if it has none."""
  what = f"the checkpoint of step {ckpt.name}" if ckpt.name.isdigit() else "the checkpoint"
  if not integrity.verify(ckpt, what):
    log.warning("%s: no %s (written by an older imprint-jax); not verified", ckpt,
                integrity.CHECKSUMS)


def restore_model_state(ckpt: Path, abstract_model: Imprint, shardings: Any | None = None
                        ) -> nnx.State:
  """The checkpoint's parameters restored into the structure of `abstract_model`
  (an `nnx.eval_shape` module), placed by `shardings` (a State of NamedShardings) if given."""
  state = nnx.state(abstract_model, nnx.Param)
  target = nnx.to_pure_dict(abstract_arrays(state, shardings))
  verify(ckpt)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
    try:
      restored = ck.restore(ckpt, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise UserError(f"{ckpt}: checkpoint does not match the model ({str(e).splitlines()[0]})"
                      ) from None
  nnx.replace_by_pure_dict(state, restored["model"])
  return state


def load_model(path: str | Path, *, dtype: str | None = None, expect_stage: int | None = None
               ) -> tuple[Imprint, dict[str, Any]]:
  """Loads a whole `Imprint` model (on the default device) and its metadata from a checkpoint.

  `expect_stage` (1 or 2) checks the UNet's input channels: a stage-2 (compositing) model has 9.
  """
  ckpt = resolve(path)
  meta = read_meta(ckpt)
  cfg = ImprintConfig.from_dict(meta["model"])
  if expect_stage is not None and cfg.stage != expect_stage:
    raise UserError(f"{ckpt}: a stage-{cfg.stage} checkpoint (UNet with"
                    f" {cfg.unet.in_channels} input channels); this needs stage {expect_stage}")
  if dtype is not None:
    cfg = cfg.with_dtype(dtype)
  abstract = nnx.eval_shape(lambda: Imprint(cfg, rngs=layers.init_rngs(0)))
  state = restore_model_state(ckpt, abstract)
  graphdef, _ = nnx.split(abstract, nnx.Param)
  return nnx.merge(graphdef, state), meta
