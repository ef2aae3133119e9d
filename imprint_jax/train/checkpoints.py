"""Training checkpoints: orbax CheckpointManager over `<workdir>/checkpoints/<step>/`.

Each checkpoint holds the whole model (so `composite` and `export` can use it directly), the
optimizer state, and JSON metadata: step, the data iterator's state, the run config and the
model config. Saves are asynchronous. Kept: the last `keep` checkpoints plus the best one by
validation loss.

Integrity (see `imprint_jax.convert.integrity`): each step folder gets `checksums.json` inside
orbax's commit; `restore` verifies the newest step and falls back to the newest intact one, setting
corrupt steps aside as `corrupt-<step>/` so the run can write those steps again.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from imprint_jax.convert import checkpoint as ckpt_lib
from imprint_jax import storage
from imprint_jax.convert import integrity
from imprint_jax.errors import UserError
from imprint_jax.train.setup import Setup, full_model_state
from imprint_jax.train.steps import TrainState, select_like


log = logging.getLogger("imprint_jax.train")


class RunCheckpoints:

  def __init__(self, workdir: str | Path, *, keep: int, use_async: bool = True):
    self.dir = storage.path(workdir) / ckpt_lib.CHECKPOINTS_DIR  # local or gs://
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    self.use_async = use_async
    self._saving: int | None = None
    # best_fn makes orbax store each checkpoint's metrics, so that `checkpoint.resolve(...,
    # "best")` can ask orbax for the best step; under a gcsfuse mount, commit-file atomicity.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=use_async, create=True,
        best_fn=lambda m: m["val_loss"], best_mode="min",
        atomicity_options=storage.atomicity_options(self.dir),
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums)
        if use_async else None)
    self.manager = ocp.CheckpointManager(self.dir, options=options,
                                         item_names=("model", "opt_state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, meta: dict[str, Any], *, val_loss: float | None = None,
           force: bool = False) -> None:
    step = int(meta["step"])
    model = full_model_state(state)
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    with self._save_errors():  # also reports a failure of the previous (async) save
      self.manager.wait_until_finished()
    self._saving = step
    with self._save_errors():
      self.manager.save(step, args=ocp.args.Composite(
          model=ocp.args.StandardSave(model),
          opt_state=ocp.args.StandardSave(state.opt_state),
          meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)
      if not self.use_async:
        self._write_checksums()

  def _step_folder_being_saved(self) -> Path:
    """The folder orbax is committing: its temporary folder (renamed after the callback) on a
    POSIX path, the final folder itself in commit-file mode (gs://)."""
    tmp = sorted(self.dir.glob(f"{self._saving}.orbax-checkpoint-tmp*"))  # by timestamp
    return tmp[-1] if tmp else self.dir / str(self._saving)

  def _write_checksums(self) -> None:
    """Orbax's post-finalization callback (primary host only, all hosts' files written)."""
    if jax.process_index() == 0 and self._saving is not None:
      integrity.write(self._step_folder_being_saved())

  @contextlib.contextmanager
  def _save_errors(self):
    """A failed save (full disk, lost permissions) -> one line; its partial folder removed."""
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      step, self._saving = self._saving, None
      if jax.process_index() == 0 and step is not None:
        for tmp in self.dir.glob(f"{step}.orbax-checkpoint-tmp*"):
          epath.Path(tmp).rmtree(missing_ok=True)
      first = next((l.strip() for l in str(e).splitlines() if l.strip()), type(e).__name__)
      if len(first) > 320:  # tensorstore: what it wrote first, the OS error at the end
        first = f"{first[:150]} ... {first[-160:]}"
      raise UserError(f"{self.dir}: saving the checkpoint of step {step} failed ({first});"
                      f" the earlier checkpoints are intact") from None

  def restore_intact(self, setup: Setup) -> tuple[TrainState, dict[str, Any]]:
    """The state of the newest step whose files match their checksums (logging each corrupt
    step it skips and setting it aside as `corrupt-<step>/`), and its metadata."""
    corrupt = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        if not integrity.verify(self.dir / str(step), f"the checkpoint of step {step}"):
          log.warning("%s: the checkpoint of step %d has no checksums (written by an older"
                      " imprint-jax, or the run stopped right after orbax's commit); restoring"
                      " it unverified", self.dir, step)
      except integrity.CorruptCheckpoint as e:
        log.error("%s", e)
        corrupt.append(step)
        continue
      if corrupt:
        log.warning("resuming from step %d, the newest intact checkpoint (corrupt: step %s,"
                    " set aside as %s)", step, ", ".join(map(str, corrupt)),
                    ", ".join(f"corrupt-{s}" for s in corrupt))
        self._set_aside(corrupt)
      return self.restore(setup, step)
    raise UserError(f"{self.dir}: no intact checkpoint to resume from (corrupt: step"
                    f" {', '.join(map(str, corrupt))}); start a new --workdir")

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        (self.dir / str(step)).rename(self.dir / f"corrupt-{step}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("imprint-jax: corrupt steps set aside")
    self.manager.reload()

  def restore(self, setup: Setup, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
    """The state at `step` (default: latest) in the run's shardings, and its metadata."""
    step = self.latest_step() if step is None else step
    abstract, shardings = setup.abstract_state, setup.state_shardings
    model_target = ckpt_lib.abstract_arrays(full_model_state(abstract),
                                            full_model_state(shardings))
    opt_target = ckpt_lib.abstract_arrays(abstract.opt_state, shardings.opt_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(model_target),
          opt_state=ocp.args.StandardRestore(opt_target),
          meta=ocp.args.JsonRestore()))
    except ValueError as e:  # orbax: the trees differ (another model or optimizer layout)
      first_two = " ".join(line.strip() for line in str(e).splitlines()[:2])  # what, where
      raise UserError(f"{self.dir}: the checkpoint of step {step} does not fit this run's"
                      " model and optimizer state (written by another config or an older"
                      f" imprint-jax?): {first_two[:300]}") from None
    model = restored["model"]
    meta = restored["meta"]
    state = TrainState(step=jax.device_put(jax.numpy.int32(meta["step"]), shardings.step),
                       params=select_like(model, abstract.params),
                       frozen=select_like(model, abstract.frozen),
                       opt_state=restored["opt_state"])
    return state, meta

  def wait(self) -> None:
    with self._save_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      with self._save_errors():
        self.manager.wait_until_finished()
    except UserError:
      try:
        self.manager.close()
      except Exception:  # the same failure again: already reported
        pass
      raise
    self.manager.close()
