"""Orbax checkpoints of the whole model, shared by import, training, compositing and export.

A checkpoint is a folder with the orbax items
  model/      the parameters of `Imprint` (dinov2, adapter, unet, vae) as a nested dict
  meta/       JSON: {"model": ImprintConfig.to_dict(), "stage": 0|1|2, "step": ..., ...}
  opt_state/  (training checkpoints only) the optimizer state
`imprint-jax import` writes one such folder; training writes `<workdir>/checkpoints/<step>/`
through an orbax CheckpointManager. `resolve()` accepts either, or a training workdir: its latest
step by default, its best by validation loss (orbax's own best step) or a given step. Paths may
be local (relative or absolute) or gs:// (`imprint_jax.storage`).
Every checkpoint also holds `checksums.json` (see `imprint_jax.convert.integrity`), verified before
its parameters are restored: a corrupt checkpoint is refused with one line naming the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from etils import epath

from imprint_jax import storage
from imprint_jax.convert import integrity
from imprint_jax.errors import UserError
from imprint_jax.models.imprint import Imprint, ImprintConfig
from imprint_jax.models import layers

CHECKPOINTS_DIR = "checkpoints"
# The sizes a stage-2 model runs at when its metadata records none (the paper's): DINOv2's
# input E, the generator's crop G, and the target window's side over the region's box.
DEFAULT_ENCODER_SIZE = 224
DEFAULT_GENERATOR_SIZE = 512
DEFAULT_CONTEXT = 2.0

log = logging.getLogger("imprint_jax")


def abstract_arrays(state: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings, if given) for every array leaf of a state."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def is_checkpoint(path: epath.Path) -> bool:
  return (path / "model").is_dir() and (path / "meta").is_dir()


WHICH_HELP = ("for a training workdir: latest (default), best (lowest validation loss) or a"
              " step number")


def parse_which(which: str | int) -> str | int:
  """'latest', 'best' or a step number; UserError otherwise."""
  text = str(which).strip()
  if text in ("latest", "best"):
    return text
  if text.isdigit():
    return int(text)
  raise UserError(f"--which {which!r}: expected latest, best or a step number")


@contextlib.contextmanager
def _quiet_absl():
  # A read-only CheckpointManager warns about each option it ignores in that mode.
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def run_manager(root: epath.Path) -> ocp.CheckpointManager:
  """A read-only orbax CheckpointManager over `root` (a workdir's checkpoints/) that knows the
  best step: the lowest `val_loss` among the checkpoints saved with metrics."""
  options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0,
      best_fn=lambda m: m["val_loss"], best_mode="min",
      atomicity_options=storage.atomicity_options(root))
  with _quiet_absl():
    return ocp.CheckpointManager(root, options=options)


def resolve(path: str | os.PathLike, which: str | int = "latest") -> epath.Path:
  """The checkpoint folder that `path` designates (see module docstring); UserError if none.

  `which` picks the step of a training workdir: "latest", "best" (orbax's best step by
  validation loss) or a step number."""
  which = parse_which(which)
  path = storage.path(path)
  if not path.exists():
    raise UserError(f"{path}: no such checkpoint or workdir")
  if is_checkpoint(path):
    if isinstance(which, int):
      raise UserError(f"{path}: one checkpoint, not a training workdir; --which {which} picks"
                      " a step of a workdir")
    return path
  root = path / CHECKPOINTS_DIR
  if not root.is_dir():
    root = path
  manager = run_manager(root)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise UserError(f"{path}: not an imprint-jax checkpoint (no model/ and meta/ inside, and"
                      f" no {CHECKPOINTS_DIR}/<step>/ holding them)")
    if which == "latest":
      step = manager.latest_step()
    elif which == "best":
      step = manager.best_step()
      if step is None:
        raise UserError(f"{path}: no checkpoint has a validation loss (eval_every=0?); use"
                        " --which latest or a step")
    else:
      if which not in steps:
        raise UserError(f"{path}: no checkpoint of step {which} (steps: "
                        f"{', '.join(map(str, steps))})")
      step = which
    found = ocp.path.step.build_step_path(root, ocp.path.step.standard_name_format(), step)
  finally:
    manager.close()
  if not is_checkpoint(found):
    raise UserError(f"{found}: not an imprint-jax checkpoint (no model/ and meta/ inside)")
  return found


def describe(ckpt: epath.Path, meta: dict[str, Any]) -> str:
  """'checkpoint PATH (step N)': what every command prints about the checkpoint it used."""
  return f"checkpoint {ckpt} (step {meta.get('step', '?')})"


def read_meta(ckpt: str | os.PathLike, which: str | int = "latest") -> dict[str, Any]:
  ckpt = resolve(ckpt, which)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
    try:
      return ck.restore(ckpt, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except (FileNotFoundError, ValueError) as e:
      raise UserError(f"{ckpt}: unreadable checkpoint metadata ({e})") from None


def settings_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
  """encoder_size, generator_size, context and prediction_type recorded in a checkpoint's
  metadata (training writes its run config under 'config'); defaults where absent."""
  config = meta.get("config") or {}
  data = config.get("data") or {}
  train = config.get("train") or {}
  return {"encoder_size": int(data.get("encoder_size", DEFAULT_ENCODER_SIZE)),
          "generator_size": int(data.get("generator_size", DEFAULT_GENERATOR_SIZE)),
          "context": float(data.get("context", DEFAULT_CONTEXT)),
          "prediction_type": str(train.get("prediction_type", "epsilon"))}


def save_model(path: str | os.PathLike, model: Imprint, meta: dict[str, Any]) -> epath.Path:
  """Writes `model` (all parameters) and `meta` + the model config as a checkpoint folder.
  Orbax writes to a temporary name and renames (or, on gs:// and gcsfuse, writes a commit
  file last), so a failed save leaves no checkpoint behind."""
  path = storage.path(path)
  if path.exists():
    raise UserError(f"{path}: already exists; choose a new --out")
  meta = dict(meta, model=model.cfg.to_dict())
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(),
                       atomicity_options=storage.atomicity_options(path)) as ck:
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


def load_model(path: str | os.PathLike, *, dtype: str | None = None,
               expect_stage: int | None = None, which: str | int = "latest"
               ) -> tuple[Imprint, dict[str, Any]]:
  """Loads a whole `Imprint` model (on the default device) and its metadata from a checkpoint.

  `expect_stage` (1 or 2) checks the UNet's input channels: a stage-2 (compositing) model has 9.
  """
  ckpt = resolve(path, which)
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
