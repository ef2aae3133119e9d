"""`imprint_jax.models.pure`: a model as a pure function of plain parameter dicts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imprint_jax.models import layers
from imprint_jax.models.adapter import AdapterConfig, ContentAdapter
from imprint_jax.models.pure import pure


def test_pure_model_equals_the_module_and_differentiates():
  model = ContentAdapter(AdapterConfig(in_dim=32, width=48, depth=2, num_heads=2, out_dim=24),
                         rngs=layers.init_rngs(0))
  apply, params = pure(model)
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert leaves and all(isinstance(x, jax.Array) for x in leaves)
  tokens = jnp.asarray(np.random.RandomState(0).randn(2, 7, 32).astype(np.float32))
  want = model(tokens)
  got = jax.jit(apply)(params, tokens)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p, tokens) ** 2)))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads))) > 0
  # The module itself is untouched: calling it again gives the same result.
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(want))
