"""Per-component optimisation: labels from parameter paths, schedules, the optax transform.

Every parameter of the model gets one component label from its path:

  dinov2        the DINOv2 encoder                       (model.dinov2.*)
  adapter       the content adapter and its null context (model.adapter.*)
  unet_decoder  the UNet's decoder: up blocks + output   (model.unet.{up_blocks,conv_norm_out,conv_out})
  unet_rest     the rest of the UNet                     (model.unet.*)
  vae           the VAE, always frozen                   (model.vae.*)

The config gives each component either a schedule (it is trained) or nothing (it is frozen).
Frozen parameters are split out of the trainable state before the optimizer is built, so they
get no gradient and no optimizer state at all.

A schedule is: linear warmup, then a value per phase (phase boundaries in steps), times an
optional cosine decay over the whole run. IMPRINT's sequential collaborative training (stage 2)
is two phases whose values are swapped between the adapter and the UNet; since the schedule is
a function of the step count inside the optimizer state, the swap happens inside the compiled
step with no recompilation. Each component's optimizer is wrapped in
`optax.inject_hyperparams`, so the learning rate actually applied sits in the optimizer state
(`applied_learning_rates`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imprint_jax.errors import UserError

COMPONENTS = ("dinov2", "adapter", "unet_decoder", "unet_rest", "vae")
TRAINABLE_COMPONENTS = ("dinov2", "adapter", "unet_decoder", "unet_rest")
UNET_DECODER = ("up_blocks", "conv_norm_out", "conv_out")


def component_of(path: Sequence[Any]) -> str:
  """The component label of a parameter path such as ('unet', 'up_blocks', 0, ...)."""
  keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
  top = keys[0]
  if top == "unet":
    return "unet_decoder" if keys[1] in UNET_DECODER else "unet_rest"
  if top in ("dinov2", "adapter", "vae"):
    return top
  raise ValueError(f"parameter path {keys} belongs to no component")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Learning rate of one component: warmup, one value per phase, optional cosine decay."""
  phase_lrs: tuple[float, ...]
  warmup_steps: int = 0
  decay: str = "constant"        # 'constant' | 'cosine'
  final_fraction: float = 0.0    # cosine decays to final_fraction x the phase value

  def __post_init__(self):
    if self.decay not in ("constant", "cosine"):
      raise UserError(f"schedule decay {self.decay!r}: expected 'constant' or 'cosine'")
    if not self.phase_lrs or any(lr < 0 for lr in self.phase_lrs):
      raise UserError(f"schedule phase_lrs {self.phase_lrs}: need non-negative values")

  def fn(self, boundaries: Sequence[int], total_steps: int) -> optax.Schedule:
    """The schedule as a traceable function of the step count."""
    if len(boundaries) != len(self.phase_lrs) - 1:
      raise UserError(f"{len(self.phase_lrs)} phase learning rates need"
                      f" {len(self.phase_lrs) - 1} phase boundaries, got {len(boundaries)}")
    lrs = jnp.asarray(self.phase_lrs, jnp.float32)
    bounds = jnp.asarray(boundaries, jnp.int32)
    warmup, decay, final = self.warmup_steps, self.decay, self.final_fraction

    def schedule(count):
      count = jnp.asarray(count, jnp.int32)
      lr = lrs[jnp.sum(count >= bounds)] if len(boundaries) else lrs[0]
      if warmup > 0:
        lr = lr * jnp.minimum(1.0, (count + 1) / warmup)
      if decay == "cosine":
        frac = jnp.clip(count / max(total_steps, 1), 0.0, 1.0)
        lr = lr * (final + (1 - final) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
      return lr

    return schedule


def schedules_from_config(components: Mapping[str, Any]) -> dict[str, Schedule | None]:
  """{'adapter': {'phase_lrs': (...), 'warmup_steps': ...} or None (frozen), ...} -> Schedules."""
  unknown = sorted(set(components) - set(TRAINABLE_COMPONENTS))
  if unknown:
    raise UserError(f"unknown component label {unknown[0]!r}: the components are"
                    f" {', '.join(TRAINABLE_COMPONENTS)}")
  out: dict[str, Schedule | None] = {}
  for name in TRAINABLE_COMPONENTS:
    spec = components.get(name)
    if spec is None:
      out[name] = None
      continue
    spec = dict(spec)
    lrs = spec.pop("phase_lrs", None)
    if lrs is None:
      if "lr" not in spec:
        raise UserError(f"component {name!r} needs 'lr' or 'phase_lrs' (or None to freeze it)")
      lrs = (spec.pop("lr"),)
    else:
      spec.pop("lr", None)
    try:
      out[name] = Schedule(phase_lrs=tuple(float(v) for v in lrs), **spec)
    except TypeError as e:
      raise UserError(f"component {name!r}: {e}") from None
  if all(s is None for s in out.values()):
    raise UserError("every component is frozen: nothing to train")
  return out


def trainable_filter(schedules: Mapping[str, Schedule | None]):
  """An nnx filter selecting the parameters of the trained components."""
  trained = {k for k, v in schedules.items() if v is not None}

  def keep(path, value):
    return isinstance(value, nnx.Param) and component_of(path) in trained

  return keep


def make_optimizer(params: nnx.State, schedules: Mapping[str, Schedule | None], *,
                   boundaries: Sequence[int], total_steps: int, weight_decay: float,
                   b1: float, b2: float, eps: float, grad_clip: float
                   ) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW per trained component with its own schedule."""
  present = sorted({component_of(p) for p, _ in nnx.to_flat_state(params)})
  transforms = {}
  for name in present:
    sched = schedules.get(name)
    if sched is None:
      raise ValueError(f"trainable state holds parameters of frozen component {name}")
    transforms[name] = optax.inject_hyperparams(optax.adamw)(
        learning_rate=sched.fn(boundaries, total_steps), b1=b1, b2=b2, eps=eps,
        weight_decay=weight_decay)
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: component_of(path), params)
  chain = [optax.multi_transform(transforms, labels)]
  if grad_clip and grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(grad_clip))
  return optax.chain(*chain)


def applied_learning_rates(opt_state: Any) -> dict[str, jax.Array]:
  """The learning rate each component's AdamW applied at its last update, from the state."""
  out = {}

  def visit(s):
    if isinstance(s, optax.MultiTransformState):
      for name, inner in s.inner_states.items():
        inner = getattr(inner, "inner_state", inner)
        out[name] = inner.hyperparams["learning_rate"]
      return
    if isinstance(s, tuple):
      for x in s:
        visit(x)

  visit(opt_state)
  return out
