"""Training checkpoints: orbax CheckpointManager over `<workdir>/checkpoints/<step>/`.

Each checkpoint holds the whole model (so `composite` and `export` can use it directly), the
optimizer state, and JSON metadata: step, the data iterator's state, the run config and the
model config. Saves are asynchronous. Kept: the last `keep` checkpoints plus the best one by
validation loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from imprint_jax import checkpoint as ckpt_lib
from imprint_jax.errors import UserError
from imprint_jax.train.setup import Setup, full_model_state
from imprint_jax.train.steps import TrainState, select_like


class RunCheckpoints:

  def __init__(self, workdir: str | Path, *, keep: int, use_async: bool = True):
    self.dir = Path(workdir).absolute() / ckpt_lib.CHECKPOINTS_DIR
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                           enable_async_checkpointing=use_async, create=True)
    self.manager = ocp.CheckpointManager(self.dir, options=options,
                                         item_names=("model", "opt_state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, meta: dict[str, Any], *, val_loss: float | None = None,
           force: bool = False) -> None:
    step = int(meta["step"])
    model = full_model_state(state)
    metrics = None if val_loss is None else {"val_loss": float(val_loss)}
    self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave(meta)), metrics=metrics, force=force)

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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
