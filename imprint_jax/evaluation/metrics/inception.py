"""The FID InceptionV3 exactly as pytorch-fid builds it (`fid_inception_v3`), in NHWC.

pytorch-fid ports the TensorFlow graph `inception-2015-12-05` (the network of the original
FID code) onto torchvision's Inception3, patching the blocks where the two differ:
  * Mixed_5b/5c/5d (FIDInceptionA), Mixed_6b..6e (FIDInceptionC) and Mixed_7b
    (FIDInceptionE_1): the pooling branch averages a 3x3 window WITHOUT counting the zero
    padding (`count_include_pad=False`, TensorFlow's 'SAME' average pool);
  * Mixed_7c (FIDInceptionE_2): the pooling branch is a 3x3 MAX pool (stride 1, pad 1), a
    quirk of that graph.
Every conv is conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU. The FID
feature is the 2048-d global average pool after Mixed_7c ("pool3"). Inputs are in [-1, 1];
the 299 x 299 resize is done before (see `fid.preprocess`).

`InceptionConfig.width_divisor` divides every channel count (1 = the real network): the
parity test builds a tiny copy of the same structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.models import layers

BN_EPS = 1e-3
DIVISORS = (1, 2, 4, 8, 16)  # every channel count of the real network divides by these


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  width_divisor: int = 1
  dtype: str = "float32"

  def __post_init__(self):
    layers.compute_dtype(self.dtype)
    if self.width_divisor not in DIVISORS:
      raise UserError(f"Inception width_divisor {self.width_divisor}: expected one of"
                      f" {DIVISORS}")

  def c(self, channels: int) -> int:
    return channels // self.width_divisor

  @property
  def feature_dim(self) -> int:
    """Width of the pool3 feature (2048 for the real network)."""
    return self.c(2048)


class FrozenBatchNorm(nnx.Module):
  """Inference BatchNorm. The statistics are Params because this network is never trained and
  the converter tables (convert/common.py) cover Params."""

  def __init__(self, n: int):
    self.scale = nnx.Param(jnp.ones((n,), jnp.float32), **layers.axes("norm"))
    self.bias = nnx.Param(jnp.zeros((n,), jnp.float32), **layers.axes("norm"))
    self.mean = nnx.Param(jnp.zeros((n,), jnp.float32), **layers.axes("norm"))
    self.var = nnx.Param(jnp.ones((n,), jnp.float32), **layers.axes("norm"))

  def __call__(self, x: jax.Array) -> jax.Array:
    inv = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return ((x - self.mean[...].astype(x.dtype)) * inv.astype(x.dtype)
            + self.bias[...].astype(x.dtype))


class BasicConv(nnx.Module):
  """torchvision BasicConv2d: conv (no bias) -> BatchNorm -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, dtype: Any,
               rngs: nnx.Rngs, stride: int = 1, padding: int | tuple[int, int] = 0):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.conv = nnx.Conv(cin, cout, (kh, kw), strides=stride, padding=((ph, ph), (pw, pw)),
                         use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                         kernel_metadata=layers.axes(None, None, "conv_in", "conv_out"))
    self.bn = FrozenBatchNorm(cout)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def _pool(x: jax.Array, op: str, stride: int, pad: int) -> jax.Array:
  """3x3 pooling: 'max' (pads with -inf, like torch) or 'avg' excluding the padding."""
  window, strides = (1, 3, 3, 1), (1, stride, stride, 1)
  padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  if op == "max":
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, padding)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)
  return total / count


class BlockA(nnx.Module):
  """FIDInceptionA (Mixed_5b/5c/5d)."""

  def __init__(self, cin: int, pool_features: int, cfg: InceptionConfig, *, rngs: nnx.Rngs):
    c, dt = cfg.c, layers.compute_dtype(cfg.dtype)
    k = dict(dtype=dt, rngs=rngs)
    self.branch1x1 = BasicConv(cin, c(64), 1, **k)
    self.branch5x5_1 = BasicConv(cin, c(48), 1, **k)
    self.branch5x5_2 = BasicConv(c(48), c(64), 5, padding=2, **k)
    self.branch3x3dbl_1 = BasicConv(cin, c(64), 1, **k)
    self.branch3x3dbl_2 = BasicConv(c(64), c(96), 3, padding=1, **k)
    self.branch3x3dbl_3 = BasicConv(c(96), c(96), 3, padding=1, **k)
    self.branch_pool = BasicConv(cin, c(pool_features), 1, **k)
    self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_pool(x, "avg", 1, 1)),
    ], axis=-1)


class BlockB(nnx.Module):
  """InceptionB (Mixed_6a): grid reduction 35 -> 17."""

  def __init__(self, cin: int, cfg: InceptionConfig, *, rngs: nnx.Rngs):
    c, dt = cfg.c, layers.compute_dtype(cfg.dtype)
    k = dict(dtype=dt, rngs=rngs)
    self.branch3x3 = BasicConv(cin, c(384), 3, stride=2, **k)
    self.branch3x3dbl_1 = BasicConv(cin, c(64), 1, **k)
    self.branch3x3dbl_2 = BasicConv(c(64), c(96), 3, padding=1, **k)
    self.branch3x3dbl_3 = BasicConv(c(96), c(96), 3, stride=2, **k)
    self.out_channels = c(384) + c(96) + cin

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _pool(x, "max", 2, 0),
    ], axis=-1)


class BlockC(nnx.Module):
  """FIDInceptionC (Mixed_6b..6e): factorised 7x7 convolutions."""

  def __init__(self, cin: int, channels_7x7: int, cfg: InceptionConfig, *, rngs: nnx.Rngs):
    c, dt = cfg.c, layers.compute_dtype(cfg.dtype)
    k = dict(dtype=dt, rngs=rngs)
    c7 = c(channels_7x7)
    self.branch1x1 = BasicConv(cin, c(192), 1, **k)
    self.branch7x7_1 = BasicConv(cin, c7, 1, **k)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **k)
    self.branch7x7_3 = BasicConv(c7, c(192), (7, 1), padding=(3, 0), **k)
    self.branch7x7dbl_1 = BasicConv(cin, c7, 1, **k)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **k)
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **k)
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **k)
    self.branch7x7dbl_5 = BasicConv(c7, c(192), (1, 7), padding=(0, 3), **k)
    self.branch_pool = BasicConv(cin, c(192), 1, **k)
    self.out_channels = 4 * c(192)

  def __call__(self, x: jax.Array) -> jax.Array:
    dbl = self.branch7x7dbl_1(x)
    for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5):
      dbl = conv(dbl)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        dbl,
        self.branch_pool(_pool(x, "avg", 1, 1)),
    ], axis=-1)


class BlockD(nnx.Module):
  """InceptionD (Mixed_7a): grid reduction 17 -> 8."""

  def __init__(self, cin: int, cfg: InceptionConfig, *, rngs: nnx.Rngs):
    c, dt = cfg.c, layers.compute_dtype(cfg.dtype)
    k = dict(dtype=dt, rngs=rngs)
    self.branch3x3_1 = BasicConv(cin, c(192), 1, **k)
    self.branch3x3_2 = BasicConv(c(192), c(320), 3, stride=2, **k)
    self.branch7x7x3_1 = BasicConv(cin, c(192), 1, **k)
    self.branch7x7x3_2 = BasicConv(c(192), c(192), (1, 7), padding=(0, 3), **k)
    self.branch7x7x3_3 = BasicConv(c(192), c(192), (7, 1), padding=(3, 0), **k)
    self.branch7x7x3_4 = BasicConv(c(192), c(192), 3, stride=2, **k)
    self.out_channels = c(320) + c(192) + cin

  def __call__(self, x: jax.Array) -> jax.Array:
    b = self.branch7x7x3_1(x)
    for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b = conv(b)
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b, _pool(x, "max", 2, 0)],
                           axis=-1)


class BlockE(nnx.Module):
  """FIDInceptionE_1 (Mixed_7b, `pool='avg'`) and FIDInceptionE_2 (Mixed_7c, `pool='max'`)."""

  def __init__(self, cin: int, pool: str, cfg: InceptionConfig, *, rngs: nnx.Rngs):
    c, dt = cfg.c, layers.compute_dtype(cfg.dtype)
    k = dict(dtype=dt, rngs=rngs)
    self.pool = pool
    self.branch1x1 = BasicConv(cin, c(320), 1, **k)
    self.branch3x3_1 = BasicConv(cin, c(384), 1, **k)
    self.branch3x3_2a = BasicConv(c(384), c(384), (1, 3), padding=(0, 1), **k)
    self.branch3x3_2b = BasicConv(c(384), c(384), (3, 1), padding=(1, 0), **k)
    self.branch3x3dbl_1 = BasicConv(cin, c(448), 1, **k)
    self.branch3x3dbl_2 = BasicConv(c(448), c(384), 3, padding=1, **k)
    self.branch3x3dbl_3a = BasicConv(c(384), c(384), (1, 3), padding=(0, 1), **k)
    self.branch3x3dbl_3b = BasicConv(c(384), c(384), (3, 1), padding=(1, 0), **k)
    self.branch_pool = BasicConv(cin, c(192), 1, **k)
    self.out_channels = c(320) + 4 * c(384) + c(192)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(b3), self.branch3x3_2b(b3),
        self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
        self.branch_pool(_pool(x, self.pool, 1, 1)),
    ], axis=-1)


class FIDInceptionV3(nnx.Module):
  """(B, H, W, 3) in [-1, 1] (299 x 299 for FID) -> (B, feature_dim) pool3 features, float32.

  Attribute names are torchvision's, so the converter's table reads like the checkpoint.
  """

  def __init__(self, cfg: InceptionConfig = InceptionConfig(), *, rngs: nnx.Rngs):
    self.cfg = cfg
    c, dt = cfg.c, layers.compute_dtype(cfg.dtype)
    k = dict(dtype=dt, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv(3, c(32), 3, stride=2, **k)
    self.Conv2d_2a_3x3 = BasicConv(c(32), c(32), 3, **k)
    self.Conv2d_2b_3x3 = BasicConv(c(32), c(64), 3, padding=1, **k)
    self.Conv2d_3b_1x1 = BasicConv(c(64), c(80), 1, **k)
    self.Conv2d_4a_3x3 = BasicConv(c(80), c(192), 3, **k)
    self.Mixed_5b = BlockA(c(192), 32, cfg, rngs=rngs)
    self.Mixed_5c = BlockA(self.Mixed_5b.out_channels, 64, cfg, rngs=rngs)
    self.Mixed_5d = BlockA(self.Mixed_5c.out_channels, 64, cfg, rngs=rngs)
    self.Mixed_6a = BlockB(self.Mixed_5d.out_channels, cfg, rngs=rngs)
    self.Mixed_6b = BlockC(self.Mixed_6a.out_channels, 128, cfg, rngs=rngs)
    self.Mixed_6c = BlockC(self.Mixed_6b.out_channels, 160, cfg, rngs=rngs)
    self.Mixed_6d = BlockC(self.Mixed_6c.out_channels, 160, cfg, rngs=rngs)
    self.Mixed_6e = BlockC(self.Mixed_6d.out_channels, 192, cfg, rngs=rngs)
    self.Mixed_7a = BlockD(self.Mixed_6e.out_channels, cfg, rngs=rngs)
    self.Mixed_7b = BlockE(self.Mixed_7a.out_channels, "avg", cfg, rngs=rngs)
    self.Mixed_7c = BlockE(self.Mixed_7b.out_channels, "max", cfg, rngs=rngs)
    assert self.Mixed_7c.out_channels == cfg.feature_dim

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    if x_BHWC.ndim != 4 or x_BHWC.shape[-1] != 3 or min(x_BHWC.shape[1:3]) < 75:
      raise UserError(f"Inception input has shape {x_BHWC.shape}; expected (B, H, W, 3) with"
                      " H, W >= 75 (299 for FID)")
    x = x_BHWC.astype(layers.compute_dtype(self.cfg.dtype))
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _pool(x, "max", 2, 0)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _pool(x, "max", 2, 0)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
