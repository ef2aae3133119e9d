"""The platform forms of attention and GroupNorm agree with each other (forward and backward).

The CPU forms are what every parity test on this machine runs; the accelerator forms are
checked here on CPU: reduction GroupNorm directly, and the TPU's splash attention kernel in
the Pallas interpreter, alone and inside `shard_map` on a data x fsdp x tensor mesh. Also the
compile target's XLA options and the logical-name -> mesh-axis resolution the layers use.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from imprint_jax.errors import UserError
from imprint_jax.models import attention, layers
from imprint_jax.parallel import compiler, sharding


def _qkv(b=2, l=256, s=256, h=2, d=40, seed=0):
  rs = np.random.RandomState(seed)
  return tuple(jnp.asarray(rs.randn(b, n, h, d).astype(np.float32)) for n in (l, s, s))


def _loss(attn):
  return lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v)))


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  np.testing.assert_allclose(a, b, rtol=0, atol=tol * float(np.abs(b).max()))


def test_cpu_attention_matches_xla():
  q, k, v = _qkv(l=64, s=20, h=4, d=8)
  _close(attention._attention_cpu(q, k, v), jax.nn.dot_product_attention(q, k, v))
  for a, b in zip(jax.grad(_loss(attention._attention_cpu), (0, 1, 2))(q, k, v),
                  jax.grad(_loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)):
    _close(a, b)


def test_cpu_attention_bfloat16():
  """bf16 inputs (a bf16 run on CPU): bf16 output and gradients, close to float32's."""
  q, k, v = _qkv(l=64, s=20, h=4, d=8)
  low = tuple(t.astype(jnp.bfloat16) for t in (q, k, v))
  out = attention._attention_cpu(*low)
  grads = jax.grad(_loss(attention._attention_cpu), (0, 1, 2))(*low)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  _close(out.astype(jnp.float32), jax.nn.dot_product_attention(q, k, v), tol=2e-2)
  for a, b in zip(grads, jax.grad(_loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)):
    _close(a.astype(jnp.float32), b, tol=3e-2)


def test_cpu_attention_query_blocks_match_one_block():
  """Long sequences run query block by query block (no (L, S) scores held at once); same
  values and gradients as the one-block form, in float32 and bf16."""
  q, k, v = _qkv(b=2, l=512, s=640, h=2, d=8)
  assert attention._query_block(512, 640) == attention._QUERY_BLOCK
  assert attention._query_block(256, 256) == 0  # small: one block
  n = lambda t: jnp.swapaxes(t, 1, 2).reshape(-1, t.shape[1], t.shape[3]) * 0.3
  qn, kn, vn = n(q), n(k), n(v)
  blocked = lambda q, k, v: attention._blocked_attention(q, k, v, 64)
  _close(blocked(qn, kn, vn), attention._softmax_attention(qn, kn, vn))
  for a, b in zip(jax.grad(_loss(blocked), (0, 1, 2))(qn, kn, vn),
                  jax.grad(_loss(attention._softmax_attention), (0, 1, 2))(qn, kn, vn)):
    _close(a, b)
  # Through the public entry point, against XLA's attention.
  _close(attention._attention_cpu(q, k, v), jax.nn.dot_product_attention(q, k, v))
  for a, b in zip(jax.grad(_loss(attention._attention_cpu), (0, 1, 2))(q, k, v),
                  jax.grad(_loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)):
    _close(a, b)
  low = tuple(t.astype(jnp.bfloat16) for t in (qn, kn, vn))
  grads = jax.grad(_loss(blocked), (0, 1, 2))(*low)
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  for a, b in zip(grads, jax.grad(_loss(attention._softmax_attention), (0, 1, 2))(qn, kn, vn)):
    _close(a.astype(jnp.float32), b, tol=3e-2)


def test_cpu_attention_query_blocks_hold_no_full_score_matrix():
  """The compiled backward's temporaries stay far below one (N, L, S) float32 tensor."""
  q, k, v = _qkv(b=1, l=2048, s=2048, h=1, d=8)
  scores_bytes = 2048 * 2048 * 4
  for attn, small in ((attention._attention_cpu, True),
                      (lambda q, k, v: attention._softmax_attention(
                          *(jnp.swapaxes(t, 1, 2)[0] for t in (q, k, v))), False)):
    compiled = jax.jit(jax.grad(_loss(attn), (0, 1, 2))).lower(q, k, v).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert (temp < scores_bytes / 4) == small, (temp, scores_bytes)


def test_splash_attention_matches_xla():
  q, k, v = _qkv()
  splash = lambda q, k, v: attention._attention_splash(q, k, v, interpret=True)
  _close(jax.jit(splash)(q, k, v), jax.nn.dot_product_attention(q, k, v))
  for a, b in zip(jax.jit(jax.grad(_loss(splash), (0, 1, 2)))(q, k, v),
                  jax.grad(_loss(jax.nn.dot_product_attention), (0, 1, 2))(q, k, v)):
    _close(a, b)


def test_splash_attention_sharded():
  """Under a data=2 x fsdp=2 x tensor=2 mesh the kernel runs per device in shard_map."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  q, k, v = _qkv(b=4, h=4, d=16)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  splash = jax.jit(lambda q, k, v: attention._attention_splash(q, k, v, interpret=True))
  with jax.set_mesh(mesh):
    out = splash(*(jax.device_put(t, sh) for t in (q, k, v)))
    assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v))
  _close(out, jax.nn.dot_product_attention(q, k, v))


def test_splash_only_for_lane_multiples():
  assert attention.splash_supported(4096, 4096) and attention.splash_supported(256, 128)
  assert not attention.splash_supported(4096, 261) and not attention.splash_supported(64, 64)


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 32), 8), ((2, 5, 16), 4), ((1, 4, 4, 6), 3)])
def test_group_norm_forms_agree(shape, groups):
  rs = np.random.RandomState(1)
  x = jnp.asarray(rs.randn(*shape).astype(np.float32) * 3 + 2)
  scale, bias = (jnp.asarray(rs.randn(shape[-1]).astype(np.float32)) for _ in range(2))
  dot = lambda x, s, b: layers._group_norm_dot(x, s, b, groups, 1e-5)
  red = lambda x, s, b: layers._group_norm_reduce(x, s, b, groups, 1e-5)
  _close(dot(x, scale, bias), red(x, scale, bias))
  # the reference: normalise each sample's group by its own mean and (biased) variance
  xg = np.asarray(x).reshape(shape[0], -1, groups, shape[-1] // groups)
  ref = (xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-5)
  _close(red(x, scale, bias), ref.reshape(shape) * np.asarray(scale) + np.asarray(bias))
  loss = lambda f: lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b)))
  for a, b in zip(jax.grad(loss(dot), (0, 1, 2))(x, scale, bias),
                  jax.grad(loss(red), (0, 1, 2))(x, scale, bias)):
    _close(a, b, 1e-4)


def test_group_norm_rejects_bad_groups():
  with pytest.raises(UserError, match="groups"):
    layers.GroupNorm(30, 8, eps=1e-5, dtype=jnp.float32)


@pytest.mark.parametrize("hw,kernel,padding", [(2, 3, ((1, 1), (1, 1))), (3, 1, ((0, 0), (0, 0))),
                                               (3, 3, ((0, 1), (0, 1))), (8, 3, ((1, 1), (1, 1)))])
def test_conv_forms_agree(hw, kernel, padding):
  """Tiny CPU convolutions run as im2col matmuls; same values and gradients as XLA's."""
  rs = np.random.RandomState(2)
  x = jnp.asarray(rs.randn(2, hw, hw, 16).astype(np.float32))
  k = jnp.asarray(rs.randn(kernel, kernel, 16, 8).astype(np.float32))
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
  ours = lambda x, k: layers._conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dn)
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=dn)
  _close(ours(x, k), ref(x, k))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, k), jax.grad(loss(ref), (0, 1))(x, k)):
    _close(a, b)
  # the model's conv layer goes through it
  conv = layers.conv(16, 8, kernel, padding=padding, dtype=jnp.float32, rngs=nnx.Rngs(0))
  uses_im2col = "conv_general_dilated" not in str(jax.make_jaxpr(lambda x: conv(x))(x))
  assert uses_im2col == (hw * hw <= layers._IM2COL_MAX_PIXELS)


def test_cpu_compiler_options_take_convolutions_off_ynnpack():
  """The CPU options keep YNNPACK for dots and reductions and give convolutions to XLA's own
  kernels (what `compiler_options` says it does, with the pinned jaxlib); none elsewhere."""
  opts = compiler.compiler_options("cpu")
  assert opts
  assert compiler.compiler_options("gpu") is None and compiler.compiler_options("tpu") is None
  x = jnp.ones((2, 16, 16, 64))
  k = jnp.ones((3, 3, 64, 64))
  w = jnp.ones((64, 512))

  def f(x, k, w):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(-1, 64) @ w, jnp.max(y.reshape(2, -1), axis=-1)

  lowered = jax.jit(f).lower(x, k, w)

  def ynn_ops(compiled):  # {'conv_general_dilated': n, ...}: the ops inside YNNPACK fusions
    ops = re.findall(r'kind=kCustom, calls=[^,]+, metadata=\{op_name="jit\(f\)/(\w+)"[^\n]*'
                     r'"kind":"__ynn_fusion"', compiled.as_text())
    return {op: ops.count(op) for op in ops}

  default, ours = ynn_ops(lowered.compile()), ynn_ops(lowered.compile(compiler_options=opts))
  # jaxlib's default: all three in YNNPACK; ours: dots and reductions
  assert default == {"conv_general_dilated": 1, "dot_general": 1, "reduce_max": 1}
  assert ours == {"dot_general": 1, "reduce_max": 1}
  np.testing.assert_allclose(lowered.compile(compiler_options=opts)(x, k, w)[0],
                             lowered.compile()(x, k, w)[0], rtol=1e-5)


def test_cpu_compiler_options_under_a_multi_device_mesh():
  """The trainer asks for the options inside its mesh (8 devices here); the one-device probe
  behind them must not fail there (it did, and the CPU steps compiled without them)."""
  compiler.cpu_options_accepted.cache_clear()
  try:
    with jax.set_mesh(jax.sharding.Mesh(np.array(jax.devices()), ("d",))):
      assert compiler.compiler_options("cpu") == dict(compiler.CPU_OPTIONS)
  finally:
    compiler.cpu_options_accepted.cache_clear()


def test_cudnn_supported_follows_cudnn_limits():
  q = lambda d, dtype=jnp.bfloat16: jnp.zeros((1, 4, 2, d), dtype)
  assert attention.cudnn_supported(q(40), q(40))          # SD 1.5's first-level heads
  assert attention.cudnn_supported(q(64, jnp.float16), q(64, jnp.float16))
  assert not attention.cudnn_supported(q(64, jnp.float32), q(64, jnp.float32))  # f32: XLA
  assert not attention.cudnn_supported(q(36), q(36))      # not a multiple of 8
  assert not attention.cudnn_supported(q(64), q(32))      # q/v head dims differ
  assert not attention.cudnn_supported(q(1024), q(1024))  # one-head adapter: too wide
  # 160 (SD 1.5's deeper heads) needs Hopper: no GPU here, so the pre-Hopper limit of 128.
  hopper = attention._gpu_compute_capability() >= (9, 0)
  assert attention.cudnn_supported(q(160), q(160)) == hopper


def test_gpu_attention_forms_trace_on_cpu():
  """Traced for GPU from this CPU host, float32 attention takes XLA's path (cuDNN would need a
  GPU to trace); `gpu_attention` rejects unknown names with a UserError."""
  q, k, v = _qkv(b=2, l=16, s=24, h=4, d=8, seed=3)
  with compiler.compiling_for("gpu"), attention.gpu_attention("xla"):
    out = jax.jit(lambda q, k, v: attention.attention(q, k, v))(q, k, v)
  _close(out, jax.nn.dot_product_attention(q, k, v))
  with pytest.raises(UserError, match="unknown GPU attention"):
    with attention.gpu_attention("flash"):
      pass


def test_gpu_attention_asks_cudnn_then_falls_back(monkeypatch):
  """On GPU, bf16 attention asks JAX for cuDNN; when JAX refuses the shapes at trace time
  (NotImplementedError, e.g. the UNet's 4096 x 261 cross-attention in jax 0.11.2) it takes
  XLA's path. JAX's cuDNN call needs a GPU, so it is replaced by one that refuses."""
  real = jax.nn.dot_product_attention
  calls = []

  def refusing(q, k, v, *, implementation=None, **kw):
    calls.append(implementation)
    if implementation == "cudnn":
      raise NotImplementedError("Unsupported sequence length")
    return real(q, k, v, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
  q, k, v = (t.astype(jnp.bfloat16) for t in _qkv(b=1, l=16, s=12, h=2, d=8, seed=4))
  with compiler.compiling_for("gpu"):
    out = attention.attention(q, k, v)
    with attention.gpu_attention("xla"):
      attention.attention(q, k, v)
  assert calls == ["cudnn", None, None]
  _close(out.astype(jnp.float32), real(q, k, v).astype(jnp.float32), tol=1e-2)


def test_cudnn_call_pads_keys_and_masks_the_padding():
  """The cuDNN call pads 261 keys to 320 and masks the padding by key lengths: the same
  attention (run here through XLA with the same arguments; cuDNN itself needs a GPU)."""
  q, k, v = _qkv(b=2, l=32, s=261, h=2, d=8, seed=5)
  want = jax.nn.dot_product_attention(q, k, v)
  _close(attention._attention_cudnn(q, k, v, implementation=None), want)
  grads = jax.grad(_loss(lambda q, k, v: attention._attention_cudnn(q, k, v, None)), (0, 1, 2))
  for a, b in zip(grads(q, k, v), jax.grad(_loss(jax.nn.dot_product_attention),
                                           (0, 1, 2))(q, k, v)):
    assert a.shape == b.shape
    _close(a, b)


@pytest.mark.parametrize("shape", [(4, 16, 64, 64), (8, 4, 32, 256), (4, 64, 256, 32)])
# Without shard_batch (result left P(batch, None, 'tensor')) the first two come back wrong.
def test_shard_batch_on_row_parallel_output_is_correct(shape):
  """The XLA (0.10.2) SPMD bug behind `shard_batch` on row-parallel outputs: `x @ w` with x
  P(batch, None, 'tensor') and w P('tensor', 'fsdp') on a 2x2x2 mesh came back with batch
  shards 1 and 2 swapped when its result was left sharded over 'tensor'. With the result
  constrained by shard_batch, every sample is right."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  b, l, c, d = shape
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rs = np.random.RandomState(0)
  x, w = rs.randn(b, l, c).astype(np.float32), rs.randn(c, d).astype(np.float32)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda x, w: sharding.shard_batch(x @ w))(
        jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))),
        jax.device_put(w, NamedSharding(mesh, P("tensor", "fsdp"))))
  np.testing.assert_allclose(np.asarray(got), x @ w, rtol=1e-4, atol=1e-3)


def test_activation_axes_follow_the_logical_rules():
  """The models name 'batch' and 'heads'; the mesh axes splitting them come from the batch axes
  and the logical-axis rules (configs/common.py's unless `logical_rules` sets others), only
  where they divide the dimension; nothing outside a mesh."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  assert sharding.activation_axes("batch", 4) == ()
  with jax.set_mesh(sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
    assert sharding.activation_axes("batch", 4) == ("data", "fsdp")
    assert sharding.activation_axes("batch", 6) == ()
    assert sharding.activation_axes("heads", 4) == ("tensor",)
    assert sharding.activation_axes("heads", 3) == ()
    assert sharding.activation_axes("cross", 4) == ()  # replicated by the rules
    with sharding.logical_rules([("heads", None)]):
      assert sharding.activation_axes("heads", 4) == ()
    with sharding.logical_rules([("heads", ("fsdp", "tensor"))]):
      assert sharding.activation_axes("heads", 4) == ("fsdp", "tensor")
      assert sharding.activation_axes("heads", 4, exclude=("data", "fsdp")) == ("tensor",)
    assert sharding.activation_axes("heads", 4) == ("tensor",)  # the context ended
    with pytest.raises(UserError, match="unknown axis 'batch'"):
      with sharding.logical_rules([("batch", "data")]):
        pass
  with jax.set_mesh(sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})):
    assert sharding.activation_axes("batch", 8) == ("fsdp",)
    assert sharding.activation_axes("heads", 8) == ()  # tensor=1 splits nothing
