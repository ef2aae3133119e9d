"""Building blocks shared by the models: initialisers, dense / conv / norm layers with logical
axis names, GELU, remat.

Every parameter carries logical axis names (its `out_sharding` metadata). The training config
maps them to mesh axes (`configs/*.py: logical_axis_rules`, applied in parallel/sharding.py),
so the models never name a mesh axis. The logical axes used across the project:

  embed      residual-stream features of a linear layer's input (ViT width, UNet channels)
  heads      attention projection features (q/k/v outputs, the output projection's input)
  mlp        feed-forward hidden features
  cross      cross-attention context features (the adapter's output width)
  conv_in    input channels of a conv kernel (kernels are HWIO)
  conv_out   output channels of a conv kernel
  norm       scales and biases of normalisation layers
  time       timestep-embedding features
  batch      the leading axis of activations (`sharding.shard_batch`; no parameter has it)

Parameters are always float32 (the master copy); `dtype` is the compute dtype.

GroupNorm and tiny convolutions have a form per platform (`compiler.platform()`), as attention
does (models/attention.py): on CPU the forms XLA's CPU backend runs fastest
(benchmarks/train_step.py --profile). tests/test_layers.py checks the forms agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.parallel import compiler, sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str) -> Any:
  """Maps a config string ('float32' | 'bfloat16' | 'float16') to a jnp dtype."""
  if name not in DTYPES:
    raise UserError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


# Initialisers that draw a flat vector and reshape it: identical in distribution to flax's, but
# XLA compiles a rank-1 threefry draw several times faster than a rank-4 one on CPU, which
# dominates the start-up of small models (tests, the quickstart).
_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def truncated_normal(stddev: float) -> Callable:
  """N(0, stddev^2) truncated to +-2 stddev (like nnx.initializers.truncated_normal)."""

  def init(key, shape, dtype=jnp.float32):
    n = math.prod(shape)
    return (jax.random.truncated_normal(key, -2.0, 2.0, (n,), jnp.float32) * stddev
            ).reshape(shape).astype(dtype)

  return init


def lecun_normal() -> Callable:
  """flax's default kernel init (variance scaling 1/fan_in, truncated normal), flat draw.
  fan_in is every kernel dimension but the last (HWI of an HWIO conv kernel)."""

  def init(key, shape, dtype=jnp.float32):
    fan_in = math.prod(shape[:-1])
    return truncated_normal(math.sqrt(1.0 / fan_in) / _TRUNC_STD)(key, shape, dtype)

  return init


class InitRngs:
  """Parameter-initialisation keys: `params()` returns fold_in(key, 0), fold_in(key, 1), ...

  The same keys, in the same order, as `nnx.Rngs(seed).params()`, so models initialise to
  the same values; but the counter is a Python int. nnx.Rngs keeps it in a Variable, and
  under tracing (jit, eval_shape) every increment makes flax probe `tracer.sharding`, whose
  error message JAX builds by walking the whole trace: model construction became quadratic
  in the number of parameters (6 s for the tiny test model, minutes at full size; 1 s now).
  Duck-types what flax's layers use of nnx.Rngs (`params()`, `default()`, calling it).
  """

  def __init__(self, seed: int | jax.Array = 0):
    self.key = jax.random.key(seed) if isinstance(seed, int) else seed
    self._count = 0

  def __call__(self) -> jax.Array:
    key = jax.random.fold_in(self.key, self._count)
    self._count += 1
    return key

  params = default = __call__


def init_rngs(seed: int = 0) -> "nnx.Rngs":
  """Keys for building a model (see InitRngs); pass as `rngs=` to any model constructor."""
  return InitRngs(seed)  # type: ignore[return-value]


def abstract(build: Callable[[Any], Any]) -> Any:
  """`build(rngs)` as a shape-only module (parameters are ShapeDtypeStructs), fast."""
  return nnx.eval_shape(lambda: build(init_rngs(0)))


def axes(*names: str | None) -> dict[str, Any]:
  """Variable metadata carrying logical axis names; sharding is applied later, not eagerly."""
  return {"out_sharding": tuple(names), "eager_sharding": False}


# Logical axes whose features tensor parallelism splits (configs/common.py maps them to the
# model-parallel mesh axis): a kernel whose input axis is one of them is row-parallel (its
# input features arrive split).
_TENSOR_PARALLEL_AXES = ("heads", "mlp")


class _Linear(nnx.Linear):
  """nnx.Linear pinning its activations' layout on a mesh (see `shard_batch`): the input
  batch-split with features whole (column-parallel or plain kernels), or, for a row-parallel
  kernel, the output (after the tensor-parallel all-reduce)."""

  def __init__(self, *args, row_parallel: bool, **kw):
    super().__init__(*args, **kw)
    self.row_parallel = row_parallel

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.row_parallel:
      return sharding.shard_batch(super().__call__(x))
    return super().__call__(sharding.shard_batch(x))


class _Conv(nnx.Conv):
  """nnx.Conv with its input batch-split and channels whole on a mesh (see `shard_batch`)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return super().__call__(sharding.shard_batch(x))


def dense(in_features: int, out_features: int, names: tuple[str | None, str | None], *,
          dtype: Any, rngs: nnx.Rngs, use_bias: bool = True,
          kernel_init: Callable | None = None) -> nnx.Linear:
  """A Linear layer; `names` are the logical axes of its (in, out) kernel."""
  kw = {"kernel_init": kernel_init or lecun_normal()}
  return _Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, rngs=rngs, kernel_metadata=axes(*names),
                 bias_metadata=axes(names[1]), row_parallel=names[0] in _TENSOR_PARALLEL_AXES,
                 **kw)


def conv(in_features: int, out_features: int, kernel_size: int, *, dtype: Any,
         rngs: nnx.Rngs, stride: int = 1, padding: Any = None, use_bias: bool = True,
         kernel_init: Callable | None = None) -> nnx.Conv:
  """A 2-D NHWC convolution with an HWIO kernel; 'SAME'-style symmetric padding by default."""
  if padding is None:
    padding = ((kernel_size // 2, kernel_size // 2),) * 2
  kw = {"kernel_init": kernel_init or lecun_normal()}
  return _Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
               padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
               rngs=rngs, kernel_metadata=axes(None, None, "conv_in", "conv_out"),
               bias_metadata=axes("conv_out"), conv_general_dilated=_conv_general_dilated,
               **kw)


# XLA's CPU convolution is about 10x slower than a matmul on feature maps of a few pixels (the
# lowest UNet level at small image sizes; `benchmarks/train_step.py --profile` shows it). Up
# to this many output pixels, CPU convolutions run as one matmul over the stacked shifted
# windows (im2col).
_IM2COL_MAX_PIXELS = 9


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          precision=None, **kw):
  """`jax.lax.conv_general_dilated`, or `_conv_im2col` for tiny stride-1 NHWC/HWIO
  convolutions on CPU (the same result within float rounding)."""
  simple = (lhs.ndim == 4 and isinstance(padding, (list, tuple))
            and all(s == 1 for s in window_strides)
            and all(d == 1 for d in (lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
            and feature_group_count == 1 and kw.get("out_sharding") is None
            and "preferred_element_type" not in kw
            and dimension_numbers == jax.lax.conv_dimension_numbers(
                lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")))
  if simple and compiler.platform() == "cpu":
    (lo_h, hi_h), (lo_w, hi_w) = padding
    out_h = lhs.shape[1] + lo_h + hi_h - rhs.shape[0] + 1
    out_w = lhs.shape[2] + lo_w + hi_w - rhs.shape[1] + 1
    if out_h * out_w <= _IM2COL_MAX_PIXELS:
      return _conv_im2col(lhs, rhs, padding, (out_h, out_w), precision)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision, **kw)


def _conv_im2col(x_BHWC, k_HWIO, padding, out_hw, precision):
  kh, kw_, cin, cout = k_HWIO.shape
  (oh, ow) = out_hw
  xp = jnp.pad(x_BHWC, ((0, 0), *padding, (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw_)],
                         axis=-1)
  return jnp.dot(cols, k_HWIO.reshape(kh * kw_ * cin, cout), precision=precision)


def layer_norm(num_features: int, *, eps: float, dtype: Any, rngs: nnx.Rngs,
               use_affine: bool = True) -> nnx.LayerNorm:
  return nnx.LayerNorm(num_features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                       use_bias=use_affine, use_scale=use_affine, rngs=rngs,
                       scale_metadata=axes("norm"), bias_metadata=axes("norm"))


def group_norm(num_features: int, num_groups: int, *, eps: float, dtype: Any,
               rngs: nnx.Rngs) -> "GroupNorm":
  del rngs  # scale 1, bias 0: nothing random
  return GroupNorm(num_features, num_groups, eps=eps, dtype=dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over the last (channel) axis of (B, ..., C) activations, with parameters
  `scale` and `bias` like `nnx.GroupNorm`.

  Statistics in float32 with the two-pass variance E[(x - mean)^2] of PyTorch (E[x^2] - E[x]^2
  loses precision on the large activations of pretrained UNets/VAEs); output in the compute
  dtype. On CPU the per-channel sums are matrix-vector products (`_group_norm_dot`): XLA's CPU
  reductions over the spatial axes of an NHWC tensor are several times slower than its
  matmuls (benchmarks/train_step.py --profile); elsewhere plain reductions
  (`_group_norm_reduce`): TPUs and GPUs fuse them well, and a matmul would round the float32
  activations to bfloat16 on TPU matrix units at default precision.
  """

  def __init__(self, num_features: int, num_groups: int, *, eps: float, dtype: Any):
    if num_features % num_groups:
      raise UserError(f"GroupNorm: {num_features} channels do not split into {num_groups} groups")
    self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32), **axes("norm"))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32), **axes("norm"))

  def __call__(self, x: jax.Array) -> jax.Array:
    impl = _group_norm_dot if compiler.platform() == "cpu" else _group_norm_reduce
    return impl(x, self.scale[...], self.bias[...], self.num_groups, self.eps).astype(
        self.dtype or x.dtype)


def _group_norm_reduce(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                       eps: float) -> jax.Array:
  b, c = x.shape[0], x.shape[-1]
  xg = x.reshape(b, -1, groups, c // groups).astype(jnp.float32)
  mean = xg.mean((1, 3), keepdims=True)
  d = xg - mean
  var = jnp.square(d).mean((1, 3), keepdims=True)
  y = (d * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  return y * scale + bias


def _group_norm_dot(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                    eps: float) -> jax.Array:
  b, c = x.shape[0], x.shape[-1]
  x_BLC = x.reshape(b, -1, c).astype(jnp.float32)
  n = x_BLC.shape[1] * (c // groups)
  # A (1, L) x (L, C) product per sample: C stays the minor axis, so XLA needs no transpose
  # of the activation (a (B, C) x L matrix-vector product costs one).
  ones_B1L = jnp.ones((b, 1, x_BLC.shape[1]), jnp.float32)

  def group_mean(t_BLC):  # (B, L, C) -> (B, C): the mean over L and the channel's group
    sums_BC = jnp.einsum("bkl,blc->bkc", ones_B1L, t_BLC)[:, 0]
    return jnp.repeat(sums_BC.reshape(b, groups, c // groups).sum(-1) / n, c // groups, axis=1)

  d_BLC = x_BLC - group_mean(x_BLC)[:, None, :]
  inv_BC = jax.lax.rsqrt(group_mean(jnp.square(d_BLC)) + eps) * scale
  return (d_BLC * inv_BC[:, None, :] + bias).reshape(x.shape)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU as torch computes it, x/2 (1 + erf(x/sqrt 2)). `jax.nn.gelu(approximate=False)`
  goes through erfc, which XLA's CPU backend evaluates about half as fast."""
  return x * 0.5 * (1 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def remat_policy_check(name: str) -> str:
  if name not in REMAT_POLICIES:
    raise UserError(f"unknown remat policy {name!r}: expected one of {sorted(REMAT_POLICIES)}")
  return name


def call_block(block: nnx.Module, *args: Any, remat: str = "none") -> Any:
  """Calls `block(*args)`, under gradient checkpointing with the named policy unless 'none';
  the outputs are constrained to the batch sharding (`shard_batch`)."""
  if remat == "none":
    out = block(*args)
  else:
    policy = REMAT_POLICIES[remat_policy_check(remat)]
    # Functional checkpoint over the block's state: `nnx.remat` writes the state back into the
    # module's variables, which fails when the module was merged inside the step's grad trace
    # ("Cannot mutate Param from a different trace level"). Blocks hold no mutable state.
    graphdef, state = nnx.split(block)
    out = jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a), policy=policy)(state, *args)
  return jax.tree.map(sharding.shard_batch, out)
