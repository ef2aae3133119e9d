"""Per-component optimisation: labels from parameter paths, schedules, the optax transform.

Every parameter of the model gets one component label from its path:

  dinov2        the DINOv2 encoder                       (model.dinov2.*)
  adapter       the content adapter and its null context (model.adapter.*)
  unet_decoder  the UNet's decoder: up blocks + output
                (model.unet.{up_blocks,conv_norm_out,conv_out})
  unet_rest     the rest of the UNet                     (model.unet.*)
  vae           the VAE, always frozen                   (model.vae.*)

The config gives each component either a schedule (it is trained) or nothing (it is frozen).
Frozen parameters are split out of the trainable state before the optimizer is built, so they
get no gradient and no optimizer state at all.

A schedule is: linear warmup, then a value per phase (phase boundaries in steps), times an
optional cosine decay over the whole run. IMPRINT's sequential collaborative training (stage 2)
is two phases whose values are swapped between the adapter and the UNet; since the schedule is
a function of the step count inside the optimizer state, the swap happens inside the compiled
step with no recompilation. Each component's AdamW state keeps the learning rate it applied
last (`applied_learning_rates`).

The update is optax's `clip_by_global_norm` followed by `adamw` per component, written as one
elementwise expression per parameter (`fused_adamw`): the chain of optax transforms makes XLA
materialise the clipped gradient and emit a separate kernel per transform for each of the
model's hundreds of arrays. `tests/test_optim.py` checks it step for step against that chain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imprint_jax.errors import UserError

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


class AdamWState(NamedTuple):
  """One component's AdamW state: its update count, the learning rate of its last update
  (the schedule at count - 1; at count 0, the schedule's first value) and the moments."""
  count: jax.Array
  learning_rate: jax.Array
  mu: Any
  nu: Any


def fused_adamw(learning_rate: optax.Schedule, *, b1: float, b2: float, eps: float,
                weight_decay: float) -> optax.GradientTransformationExtraArgs:
  """`optax.adamw` (bias-corrected moments, decoupled weight decay on every parameter) whose
  update also takes the gradient-clipping factor, `grad_scale`, so that clipping, both moments,
  the weight decay and the learning rate are one expression per parameter.

  Same arithmetic as optax's `clip_by_global_norm` + `inject_hyperparams(adamw)`, in fewer and
  fuller kernels.
  """

  def init(params):
    return AdamWState(count=jnp.zeros([], jnp.int32),
                      learning_rate=jnp.asarray(learning_rate(0), jnp.float32),
                      mu=jax.tree.map(jnp.zeros_like, params),
                      nu=jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None, *, grad_scale=1.0, **extra):
    del extra
    if params is None:
      raise ValueError("fused_adamw needs the parameters (weight decay)")
    lr = jnp.asarray(learning_rate(state.count), jnp.float32)
    count = optax.safe_increment(state.count)
    bc1 = 1 - jnp.asarray(b1, jnp.float32) ** count
    bc2 = 1 - jnp.asarray(b2, jnp.float32) ** count

    def moment1(g, m):
      return (1 - b1) * (g * grad_scale).astype(m.dtype) + b1 * m

    def moment2(g, v):
      return (1 - b2) * jnp.square((g * grad_scale).astype(v.dtype)) + b2 * v

    mu = jax.tree.map(moment1, grads, state.mu)
    nu = jax.tree.map(moment2, grads, state.nu)

    def step(m, v, p):
      u = (m / bc1) / (jnp.sqrt(v / bc2) + eps) + weight_decay * p
      return (-lr * u).astype(p.dtype)

    updates = jax.tree.map(step, mu, nu, params)
    return updates, AdamWState(count=count, learning_rate=lr, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(params: Any, schedules: Mapping[str, Schedule | None], *,
                   boundaries: Sequence[int], total_steps: int, weight_decay: float,
                   b1: float, b2: float, eps: float, grad_clip: float
                   ) -> optax.GradientTransformationExtraArgs:
  """Global-norm clipping (off when `grad_clip` <= 0), then AdamW per trained component with
  its own schedule: `fused_adamw` in an `optax.multi_transform`, whose state is the
  optimizer state."""
  present = sorted({component_of(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)})
  transforms = {}
  for name in present:
    sched = schedules.get(name)
    if sched is None:
      raise ValueError(f"trainable state holds parameters of frozen component {name}")
    transforms[name] = fused_adamw(sched.fn(boundaries, total_steps), b1=b1, b2=b2, eps=eps,
                                   weight_decay=weight_decay)
  def labels(params):  # a function: the state's plain dicts and nnx.State get the same labels
    return jax.tree_util.tree_map_with_path(lambda path, _: component_of(path), params)

  per_component = optax.multi_transform(transforms, labels)
  clip = grad_clip if grad_clip and grad_clip > 0 else None

  def update(grads, state, params=None, **extra):
    scale = 1.0
    if clip is not None:  # optax.clip_by_global_norm's factor
      norm = optax.global_norm(grads)
      scale = jnp.where(norm < clip, 1.0, clip / norm)
    return per_component.update(grads, state, params, grad_scale=scale, **extra)

  return optax.GradientTransformationExtraArgs(per_component.init, update)


def applied_learning_rates(opt_state: Any) -> dict[str, jax.Array]:
  """The learning rate each component's AdamW applied at its last update, from the state."""
  out = {}

  def visit(s):
    if isinstance(s, optax.MultiTransformState):
      for name, inner in s.inner_states.items():
        inner = getattr(inner, "inner_state", inner)  # inside optax.MaskedState
        out[name] = inner.learning_rate
      return
    if isinstance(s, tuple):
      for x in s:
        visit(x)

  visit(opt_state)
  return out
