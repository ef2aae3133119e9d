"""Building blocks shared by the models: layers with logical axis names, attention, remat.

Every parameter carries logical axis names (its `out_sharding` metadata). The training config
maps them to mesh axes (`configs/*.py: logical_axis_rules`), so the models never name a mesh.
The logical axes used across the project:

  embed      residual-stream features of a linear layer's input (ViT width, UNet channels)
  heads      attention projection features (q/k/v outputs, the output projection's input)
  mlp        feed-forward hidden features
  cross      cross-attention context features (the adapter's output width)
  conv_in    input channels of a conv kernel (kernels are HWIO)
  conv_out   output channels of a conv kernel
  norm       scales and biases of normalisation layers
  time       timestep-embedding features

Parameters are always float32 (the master copy); `dtype` is the compute dtype.

Attention, GroupNorm and tiny convolutions have a form per platform (`platform()`): on TPU
splash attention, on GPU cuDNN attention, on CPU the forms XLA's CPU backend runs fastest
(benchmarks/train_step.py --profile). tests/test_layers.py checks the forms agree.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("platform", default=None)


def platform() -> str:
  """The platform the code being traced is compiled for: the one set by `compiling_for`, else
  JAX's default backend. Picks the CPU or accelerator forms of attention, GroupNorm and
  convolution."""
  return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value: Any) -> Iterator[None]:
  """Sets a tracing setting for the duration of a `with` block."""
  token = var.set(value)
  try:
    yield
  finally:
    var.reset(token)


def compiling_for(name: str) -> contextlib.AbstractContextManager[None]:
  """Traces model code for platform `name` ('cpu', 'gpu', 'tpu'), e.g. when compiling ahead
  of time for TPU devices from a CPU host (`imprint-jax plan --topology`). JAX caches traces
  per function object and does not see this setting: trace a function not traced before."""
  return _setting(_PLATFORM, name)


# XLA:CPU (jaxlib 0.10.2) hands dots, reductions and convolutions to YNNPACK by default. Its
# 3x3 convolutions at 32-128 channels run at about half the speed of XLA's own (Eigen) ones on
# this project's CPU shapes, so our compiled steps keep YNNPACK for dots and reductions only.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(name: str | None = None) -> dict[str, str] | None:
  """XLA options for compiling the model's steps for platform `name` (default: `platform()`),
  for `jax.jit(..., compiler_options=...)` or `Lowered.compile`; None where there are none.
  An XLA that does not know an option (another jaxlib) gets none, with a warning."""
  if (name or platform()) != "cpu":
    return None
  return dict(_CPU_OPTIONS) if _cpu_options_accepted() else None


@functools.cache
def _cpu_options_accepted() -> bool:
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    x = jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu)
    with jax.set_mesh(None):  # a caller's multi-device mesh would refuse the one-device probe
      jax.jit(lambda x: x + 1).lower(x).compile(compiler_options=_CPU_OPTIONS)
    return True
  except Exception as e:  # noqa: BLE001 - any refusal means: compile without them
    log.warning("this XLA does not take the CPU compiler options %s (%s); compiling without",
                _CPU_OPTIONS, str(e).splitlines()[0][:200])
    return False


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


# Logical axes that the sharding rules split over 'tensor' (configs/common.py): a kernel whose
# input axis is one of them is row-parallel (its input features arrive split).
_TENSOR_PARALLEL_AXES = ("heads", "mlp")


class _Linear(nnx.Linear):
  """nnx.Linear pinning its activations' layout on a mesh (see `shard_batch`): the input
  batch-split with features whole (column-parallel or plain kernels), or, for a row-parallel
  kernel, the output (after the all-reduce over 'tensor')."""

  def __init__(self, *args, row_parallel: bool, **kw):
    super().__init__(*args, **kw)
    self.row_parallel = row_parallel

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.row_parallel:
      return shard_batch(super().__call__(x))
    return super().__call__(shard_batch(x))


class _Conv(nnx.Conv):
  """nnx.Conv with its input batch-split and channels whole on a mesh (see `shard_batch`)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return super().__call__(shard_batch(x))


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
# lowest UNet level at small image sizes; `benchmarks/train_step.py --profile` shows it). Up to this many output pixels, CPU convolutions
# run as one matmul over the stacked shifted windows (im2col).
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
  if simple and platform() == "cpu":
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
    impl = _group_norm_dot if platform() == "cpu" else _group_norm_reduce
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


def attention(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, *,
              upcast: bool = False) -> jax.Array:
  """Softmax attention, (B, L, H, D) layout, by platform (`platform()`):

  * TPU: splash attention (`_attention_splash`, a Pallas flash-attention kernel that never
    materialises the (L, S) scores) when both sequence lengths are multiples of 128 - the
    UNet's self-attention at 64x64, 32x32 and 16x16 latents - else XLA's fused path;
  * GPU: cuDNN flash attention (`_attention_cudnn`: keys padded to a multiple of 64, masked)
    where cuDNN takes the shapes (`cudnn_supported`), else XLA's fused path (JAX's default
    for `implementation=None` is XLA, never cuDNN); `gpu_attention("xla")` turns cuDNN off;
  * CPU: `_attention_cpu`, the layout XLA's CPU backend runs fastest.

  `upcast` computes in float32 (SD 2.x's `upcast_attention`), returning the input dtype.
  """
  dtype = q_BLHD.dtype
  if upcast:
    q_BLHD, k_BSHD, v_BSHD = (t.astype(jnp.float32) for t in (q_BLHD, k_BSHD, v_BSHD))
  where = platform()
  if where == "cpu":
    out = _attention_cpu(q_BLHD, k_BSHD, v_BSHD)
  elif where == "tpu" and splash_supported(q_BLHD.shape[1], k_BSHD.shape[1]):
    out = _attention_splash(q_BLHD, k_BSHD, v_BSHD)
  elif where == "gpu" and _GPU_ATTENTION.get() == "cudnn" and cudnn_supported(
      q_BLHD, v_BSHD):
    try:
      out = _attention_cudnn(q_BLHD, k_BSHD, v_BSHD)
    except NotImplementedError:  # JAX's further checks at trace time (vary by version)
      out = jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD)
  else:
    out = jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD)
  return out.astype(dtype)


# cuDNN's flash attention takes key lengths that are multiples of this (JAX refuses others
# for some versions and masks, e.g. the UNet's cross-attention over 261 DINOv2 tokens).
_CUDNN_KV_MULTIPLE = 64


def _attention_cudnn(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array,
                     implementation: str | None = "cudnn") -> jax.Array:
  """cuDNN flash attention; keys and values padded with zeros to a multiple of
  `_CUDNN_KV_MULTIPLE` and the padding masked out by `key_value_seq_lengths` (cuDNN's padding
  mask, which needs the query lengths too), so the result is that of the unpadded keys.
  `implementation=None` runs the same call through XLA (tests on CPU)."""
  b, l = q_BLHD.shape[:2]
  s = k_BSHD.shape[1]
  pad = -s % _CUDNN_KV_MULTIPLE
  if not pad:
    return jax.nn.dot_product_attention(q_BLHD, k_BSHD, v_BSHD, implementation=implementation)
  k_BSHD, v_BSHD = (jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))) for t in (k_BSHD, v_BSHD))
  return jax.nn.dot_product_attention(
      q_BLHD, k_BSHD, v_BSHD, query_seq_lengths=jnp.full((b,), l, jnp.int32),
      key_value_seq_lengths=jnp.full((b,), s, jnp.int32), implementation=implementation)


_GPU_ATTENTION: contextvars.ContextVar[str] = contextvars.ContextVar("gpu_attention",
                                                                    default="cudnn")


def gpu_attention(implementation: str) -> contextlib.AbstractContextManager[None]:
  """Traces GPU attention with `implementation`: 'cudnn' (the default: cuDNN flash attention
  where `cudnn_supported`) or 'xla' (XLA's fused path everywhere; for comparisons)."""
  if implementation not in ("cudnn", "xla"):
    raise UserError(f"unknown GPU attention {implementation!r}: expected 'cudnn' or 'xla'")
  return _setting(_GPU_ATTENTION, implementation)


def cudnn_supported(q_BLHD: jax.Array, v_BSHD: jax.Array) -> bool:
  """Whether cuDNN's flash attention takes these inputs (the conditions JAX checks before
  calling it, jax/_src/cudnn/fused_attention_stablehlo.py): bf16/fp16, equal q/v head dims,
  a multiple of 8 and at most 128 (256 on Hopper and later). SD 1.5's UNet heads (40, 80,
  160) and DINOv2's (64) qualify on an H100; the one-head adapter and VAE attention do not
  and take XLA's path."""
  d = q_BLHD.shape[-1]
  if q_BLHD.dtype not in (jnp.bfloat16, jnp.float16) or v_BSHD.shape[-1] != d or d % 8:
    return False
  return d <= (256 if _gpu_compute_capability() >= (9, 0) else 128)


@functools.cache
def _gpu_compute_capability() -> tuple[int, ...]:
  """The first GPU's compute capability; (0,) when there is none (tracing for GPU from a
  CPU host)."""
  try:
    return tuple(int(x) for x in jax.devices("gpu")[0].compute_capability.split("."))
  except (RuntimeError, AttributeError, ValueError):
    return (0,)


_SPLASH_LANES = 128  # the kernel's block sizes are multiples of the TPU's 128 lanes


def splash_supported(q_len: int, kv_len: int) -> bool:
  return q_len % _SPLASH_LANES == 0 and kv_len % _SPLASH_LANES == 0


def _splash_block(n: int) -> int:
  return next(b for b in (512, 256, 128) if n % b == 0)


def _attention_splash(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array, *,
                      interpret: bool = False) -> jax.Array:
  """Splash attention (jax.experimental.pallas.ops.tpu) with a full (unmasked) mask, one
  kernel call per sample. A Pallas call is not partitioned by XLA, so under a mesh it runs in
  `shard_map` over the batch axes (and heads over `tensor` when they divide), each device on
  its own samples. `interpret` runs the kernel in the Pallas interpreter (tests on CPU)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  b, l, h, d = q_BLHD.shape
  s = k_BSHD.shape[1]
  mesh = jax.sharding.get_abstract_mesh()
  batch_axes = _batch_axes(mesh, b)
  head_axis = ("tensor" if not mesh.empty and "tensor" in mesh.axis_names
               and mesh.shape["tensor"] > 1 and h % mesh.shape["tensor"] == 0 else None)
  local_heads = h // (mesh.shape[head_axis] if head_axis else 1)
  bq, bkv = _splash_block(l), _splash_block(s)
  kernel = splash.make_splash_mha(
      masks.MultiHeadMask([masks.FullMask((l, s)) for _ in range(local_heads)]),
      head_shards=1, q_seq_shards=1, interpret=interpret,
      block_sizes=splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                    block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                    block_q_dq=bq, block_kv_dq=bkv))
  scale = jnp.asarray(d ** -0.5, q_BLHD.dtype)

  def local(q, k, v):  # (b', L, h', D) blocks of one device
    q_BHLD, k_BHSD, v_BHSD = (jnp.swapaxes(t, 1, 2) for t in (q * scale, k, v))
    return jnp.swapaxes(jax.vmap(kernel)(q_BHLD, k_BHSD, v_BHSD), 1, 2)

  if not batch_axes and head_axis is None:
    return local(q_BLHD, k_BSHD, v_BSHD)
  spec = jax.sharding.PartitionSpec(_axes_entry(batch_axes), None, head_axis, None)
  return jax.shard_map(local, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q_BLHD, k_BSHD, v_BSHD)


def _attention_cpu(q_BLHD: jax.Array, k_BSHD: jax.Array, v_BSHD: jax.Array) -> jax.Array:
  """Softmax attention as XLA's CPU backend runs it fastest (benchmarks/networks.py):

  * heads moved ahead of the sequence first, so every product is a plain batched matmul over
    contiguous (L, D) / (S, D) tiles;
  * the softmax normalisation deferred to the (L, D) output, so the (L, S) scores are never
    divided, broadcast or copied into another layout (`jax.nn.dot_product_attention`'s XLA
    path does all of these on the scores);
  * a hand-written backward (`_softmax_attention`) whose products all have forms YNNPACK or
    XLA run fast at small head sizes.

  Same result within float rounding."""
  b, l, h, d = q_BLHD.shape
  s = k_BSHD.shape[1]
  scale = jnp.asarray(d ** -0.5, q_BLHD.dtype)
  q_NLD, k_NSD, v_NSD = (jnp.swapaxes(t, 1, 2).reshape(b * h, t.shape[1], d)
                         for t in (q_BLHD * scale, k_BSHD, v_BSHD))
  block = _query_block(l, s)
  if block:
    out_NLD = _blocked_attention(q_NLD, k_NSD, v_NSD, block)
  else:
    out_NLD = _softmax_attention(q_NLD, k_NSD, v_NSD)
  return jnp.swapaxes(out_NLD.reshape(b, h, l, d), 1, 2).astype(q_BLHD.dtype)


# Above this many scores per head (L x S), the CPU attention runs query block by query block
# (`_blocked_attention`): the whole (N, L, S) score tensor, and in the backward its
# probabilities and gradient, would otherwise be held at once (4096 x 4096 per head at 64x64
# latents), and its passes over memory dominate. Blocks of `_QUERY_BLOCK` rows keep each
# block's scores in cache. One block is faster up to the UNet's 256-token (16x16-latent)
# self-attention, blocks from 512 tokens on (`benchmarks/networks.py --scale cpu32`).
_BLOCKED_MIN_SCORES = 256 * 256
_QUERY_BLOCK = 64


def _query_block(l: int, s: int) -> int:
  """The query block `_attention_cpu` uses for L queries over S keys; 0 for one block."""
  if l * s <= _BLOCKED_MIN_SCORES:
    return 0
  return next((bq for bq in (_QUERY_BLOCK, 32) if l % bq == 0 and bq < l), 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q_NLD: jax.Array, k_NSD: jax.Array, v_NSD: jax.Array,
                       block: int) -> jax.Array:
  """`_softmax_attention` computed over query blocks of `block` rows (L % block == 0): at most
  one block's (N, block, S) scores exist at a time, forward and backward. Each block's
  softmax is exact over all S keys, so no online rescaling is needed; the backward recomputes
  each block's probabilities from the saved log-sum-exp (N, L) instead of storing them, and
  accumulates dk and dv over the blocks."""
  return _blocked_attention_fwd(q_NLD, k_NSD, v_NSD, block)[0]


def _blocks(t_NLX: jax.Array, block: int) -> jax.Array:
  """(N, L, X) -> (L // block, N, block, X), the layout `lax.map`/`scan` iterate over."""
  n, l, x = t_NLX.shape
  return jnp.moveaxis(t_NLX.reshape(n, l // block, block, x), 1, 0)


def _unblocks(t_KNBX: jax.Array) -> jax.Array:
  k, n, b, x = t_KNBX.shape
  return jnp.moveaxis(t_KNBX, 0, 1).reshape(n, k * b, x)


def _blocked_attention_fwd(q_NLD, k_NSD, v_NSD, block):
  def one(q_NBD):
    s_NBS = jnp.einsum("nbd,nsd->nbs", q_NBD, k_NSD, preferred_element_type=jnp.float32)
    max_NB1 = s_NBS.max(-1, keepdims=True)
    p_NBS = jnp.exp(s_NBS - max_NB1)
    sum_NB1 = p_NBS.sum(-1, keepdims=True)
    out_NBD = jnp.einsum("nbs,nsd->nbd", p_NBS.astype(v_NSD.dtype), v_NSD,
                         preferred_element_type=jnp.float32) / sum_NB1
    return out_NBD, max_NB1 + jnp.log(sum_NB1)

  out_KNBD, lse_KNB1 = jax.lax.map(one, _blocks(q_NLD, block))
  out_NLD, lse_NL1 = _unblocks(out_KNBD), _unblocks(lse_KNB1)
  return out_NLD, (q_NLD, k_NSD, v_NSD, out_NLD, lse_NL1)


def _blocked_attention_bwd(block, res, dout_NLD):
  q_NLD, k_NSD, v_NSD, out_NLD, lse_NL1 = res
  n, s, d = k_NSD.shape
  delta_NL1 = jnp.sum(dout_NLD * out_NLD, -1, keepdims=True)

  def one(carry, xs):
    dk_NDS, dv_NDS = carry
    q_NBD, dout_NBD, lse_NB1, delta_NB1 = xs
    s_NBS = jnp.einsum("nbd,nsd->nbs", q_NBD, k_NSD, preferred_element_type=jnp.float32)
    p_NBS = jnp.exp(s_NBS - lse_NB1)  # normalised probabilities
    dp_NBS = jnp.einsum("nbd,nsd->nbs", dout_NBD.astype(v_NSD.dtype), v_NSD,
                        preferred_element_type=jnp.float32)
    ds_NBS = p_NBS * (dp_NBS - delta_NB1)
    dq_NBD = jnp.einsum("nbs,nsd->nbd", ds_NBS.astype(k_NSD.dtype), k_NSD,
                        preferred_element_type=jnp.float32)
    # (N, D, S) products, as in `_softmax_attention_bwd`, transposed once after the loop.
    dk_NDS = dk_NDS + jnp.einsum("nbs,nbd->nds", ds_NBS.astype(q_NBD.dtype), q_NBD,
                                 preferred_element_type=jnp.float32)
    dv_NDS = dv_NDS + jnp.einsum("nbs,nbd->nds", p_NBS.astype(v_NSD.dtype),
                                 dout_NBD.astype(v_NSD.dtype),
                                 preferred_element_type=jnp.float32)
    return (dk_NDS, dv_NDS), dq_NBD

  zeros = jnp.zeros((n, d, s), jnp.float32)
  (dk_NDS, dv_NDS), dq_KNBD = jax.lax.scan(
      one, (zeros, zeros), tuple(_blocks(t, block) for t in
                                 (q_NLD, dout_NLD, lse_NL1, delta_NL1)))
  dk_NSD, dv_NSD = (jnp.swapaxes(jax.lax.optimization_barrier(t), 1, 2)
                    for t in (dk_NDS, dv_NDS))
  return (_unblocks(dq_KNBD).astype(q_NLD.dtype), dk_NSD.astype(k_NSD.dtype),
          dv_NSD.astype(v_NSD.dtype))


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


@jax.custom_vjp
def _softmax_attention(q_NLD: jax.Array, k_NSD: jax.Array, v_NSD: jax.Array) -> jax.Array:
  """softmax(q k^T) v over N heads, q pre-scaled; float32 out.

  The backward is written out because the one autodiff derives computes dv = p^T do (and
  dk = ds^T q) as a (N, S, D) product contracting the scores' major axis, a form YNNPACK does
  not take and XLA's own dot runs an order of magnitude slower when D is a few channels than
  the (N, D, S) product transposed afterwards that this backward computes. An optimisation
  barrier keeps XLA from folding that transpose back into the dot."""
  return _softmax_attention_fwd(q_NLD, k_NSD, v_NSD)[0]


def _softmax_attention_fwd(q_NLD, k_NSD, v_NSD):
  s_NLS = jnp.einsum("nld,nsd->nls", q_NLD, k_NSD, preferred_element_type=jnp.float32)
  p_NLS = jnp.exp(s_NLS - s_NLS.max(-1, keepdims=True))
  sum_NL1 = p_NLS.sum(-1, keepdims=True)
  out_NLD = jnp.einsum("nls,nsd->nld", p_NLS.astype(v_NSD.dtype), v_NSD,
                       preferred_element_type=jnp.float32) / sum_NL1
  return out_NLD, (q_NLD, k_NSD, v_NSD, out_NLD, p_NLS, sum_NL1)


def _softmax_attention_bwd(res, dout_NLD):
  q_NLD, k_NSD, v_NSD, out_NLD, p_NLS, sum_NL1 = res
  # softmax backward with the normalisation folded in: ds = (p / sum) * (dp - <dout, out>)
  dp_NLS = jnp.einsum("nld,nsd->nls", dout_NLD.astype(v_NSD.dtype), v_NSD,
                      preferred_element_type=jnp.float32)
  delta_NL1 = jnp.sum(dout_NLD * out_NLD, -1, keepdims=True)
  ds_NLS = p_NLS * ((dp_NLS - delta_NL1) / sum_NL1)
  dq_NLD = jnp.einsum("nls,nsd->nld", ds_NLS.astype(k_NSD.dtype), k_NSD,
                      preferred_element_type=jnp.float32)
  dk_NDS = jnp.einsum("nls,nld->nds", ds_NLS.astype(q_NLD.dtype), q_NLD,
                      preferred_element_type=jnp.float32)
  dv_NDS = jnp.einsum("nls,nld->nds", p_NLS.astype(v_NSD.dtype),
                      (dout_NLD / sum_NL1).astype(v_NSD.dtype),
                      preferred_element_type=jnp.float32)
  dk_NSD, dv_NSD = (jnp.swapaxes(jax.lax.optimization_barrier(t), 1, 2)
                    for t in (dk_NDS, dv_NDS))
  return (dq_NLD.astype(q_NLD.dtype), dk_NSD.astype(k_NSD.dtype), dv_NSD.astype(v_NSD.dtype))


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


BATCH_AXES = ("data", "fsdp")


def shard_batch(x: jax.Array) -> jax.Array:
  """Constrains an activation to be split over the batch axes of the ambient mesh and
  replicated along its other dimensions; a no-op outside `jax.set_mesh` or when the batch
  does not divide.

  Used at block boundaries and on the inputs of every convolution and dense layer, except
  row-parallel dense layers (a ('heads'|'mlp', 'embed') kernel: attention output and MLP
  output layers), whose outputs it constrains instead. Besides documenting the intended
  layout, it stops the SPMD partitioner from choosing layouts that mix batch, fsdp and tensor
  sharding: without it, XLA (0.10.2, CPU; Shardy and GSPMD alike) computed a wrong UNet
  forward and wrong gradients on a data=2 x fsdp=2 x tensor=2 mesh. The known case: `x @ w`
  with x sharded P(('data', 'fsdp'), None, 'tensor'), w P('tensor', 'fsdp') (a ('heads'|'mlp',
  'embed') kernel) and the result P(('data', 'fsdp'), None, 'tensor') is partitioned with a
  collective-permute of x that swaps batch shards 1 and 2 and is never undone, so those
  samples get each other's output. Constraining the result to P(('data', 'fsdp')) (features
  replicated, the usual tensor-parallel all-reduce) avoids that partitioning. The backward
  passes of column-parallel dense layers (dx = dy @ w.T) and of convolutions (kernels split
  over fsdp on input and tensor on output channels) are the same product; constraining the
  layer's input constrains dx. tests/test_train.py checks the sharded step and the sharded
  UNet forward and gradients; tests/test_layers.py the product itself.
  """
  if not hasattr(x, "shape") or x.ndim == 0:
    return x
  axes = _batch_axes(jax.sharding.get_abstract_mesh(), x.shape[0])
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(_axes_entry(axes)))


def _batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The batch axes of `mesh` (size > 1) that split a batch of `batch`; () when there is no
  mesh, none of them is split, or the batch does not divide."""
  if mesh.empty:
    return ()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def _axes_entry(axes: tuple[str, ...]):
  """One PartitionSpec entry for mesh axes: None, a name, or a tuple of names."""
  return None if not axes else axes[0] if len(axes) == 1 else axes


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
  return jax.tree.map(shard_batch, out)
