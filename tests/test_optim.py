"""The fused per-component AdamW against optax's chain of transforms it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from imprint_jax.train import optim


def _params():
  rng = np.random.default_rng(0)
  shapes = {"adapter": {"w": (5, 3), "b": (3,)},
            "unet": {"down_blocks": {"k": (3, 3, 2, 4)}, "up_blocks": {"k": (4, 2), "b": (2,)}}}
  return nnx.State(jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32),
                               shapes, is_leaf=lambda x: isinstance(x, tuple)))


def _schedules():
  return {"adapter": optim.Schedule(phase_lrs=(1e-2, 1e-3), warmup_steps=2),
          "unet_rest": optim.Schedule(phase_lrs=(1e-3, 3e-2), decay="cosine",
                                      final_fraction=0.1),
          "unet_decoder": optim.Schedule(phase_lrs=(5e-3, 5e-3))}


def _reference(params, schedules, boundaries, total, grad_clip, **hp):
  """What make_optimizer was before the fusion: optax's clip, then inject_hyperparams(adamw)."""
  transforms = {name: optax.inject_hyperparams(optax.adamw)(
      learning_rate=s.fn(boundaries, total), weight_decay=hp["weight_decay"], b1=hp["b1"],
      b2=hp["b2"], eps=hp["eps"]) for name, s in schedules.items()}
  labels = jax.tree_util.tree_map_with_path(lambda p, _: optim.component_of(p), params)
  chain = [optax.multi_transform(transforms, labels)]
  if grad_clip > 0:
    chain.insert(0, optax.clip_by_global_norm(grad_clip))
  return optax.chain(*chain)


@pytest.mark.parametrize("grad_clip", [0.0, 0.5, 100.0])
def test_fused_adamw_matches_optax_chain(grad_clip):
  params = _params()
  hp = {"weight_decay": 0.01, "b1": 0.9, "b2": 0.99, "eps": 1e-8}
  boundaries, total = (3,), 8
  ours = optim.make_optimizer(params, _schedules(), boundaries=boundaries, total_steps=total,
                              grad_clip=grad_clip, **hp)
  ref = _reference(params, _schedules(), boundaries, total, grad_clip, **hp)
  p_ours, p_ref = params, params
  s_ours, s_ref = ours.init(params), ref.init(params)
  clipped = 0
  for step in range(total):
    grads = jax.tree.map(lambda p: jnp.sin(p * (step + 1)) * 0.3, p_ref)
    clipped += grad_clip > 0 and float(optax.global_norm(grads)) > grad_clip
    u, s_ours = jax.jit(ours.update)(grads, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = jax.jit(ref.update)(grads, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7),
                 p_ours, p_ref)
    lrs = optim.applied_learning_rates(s_ours)
    ref_lrs = {k: v.inner_state.hyperparams["learning_rate"]
               for k, v in s_ref[-1].inner_states.items()}
    assert set(lrs) == set(ref_lrs) == {"adapter", "unet_rest", "unet_decoder"}
    for k in lrs:
      np.testing.assert_allclose(lrs[k], ref_lrs[k], rtol=1e-6)
  # the clip threshold 0.5 clips every step, 100 none: both paths were exercised
  assert clipped == (total if grad_clip == 0.5 else 0)
  # the learning rates moved: warmup, the phase boundary and the cosine all took effect
  assert float(optim.applied_learning_rates(s_ours)["unet_rest"]) > 3e-3


def test_fused_adamw_keeps_no_state_for_other_components():
  params = _params()
  tx = optim.make_optimizer(params, _schedules(), boundaries=(3,), total_steps=8,
                            weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
  state = tx.init(params)
  adapter = state.inner_states["adapter"].inner_state
  assert isinstance(adapter, optim.AdamWState)
  # moments only for the adapter's two arrays; the UNet's are masked out
  assert [x.shape for x in jax.tree.leaves(adapter.mu)] == [(3,), (5, 3)]
