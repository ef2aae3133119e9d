"""The layers of the Stable Diffusion UNet (models/unet.py), each numerically the same as its
diffusers namesake: the timestep embedding, `ResnetBlock2D`, the attention and GEGLU
feed-forward of `BasicTransformerBlock`, `Transformer2DModel`, and the down/upsamplers. NHWC.
tests/test_unet.py compares each with diffusers' block.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imprint_jax.models import attention, layers
from imprint_jax.parallel import sharding

# diffusers' GroupNorm in Transformer2DModel has a fixed eps, independent of `norm_eps`.
_TRANSFORMER_GN_EPS = 1e-6
_TRANSFORMER_LN_EPS = 1e-5


def timestep_embedding(t_B: jax.Array, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep features (B, dim), float32, as diffusers' `get_timestep_embedding`.

  `t_B` holds (possibly fractional) timesteps in [0, num_train_timesteps).
  """
  half = dim // 2
  exponent = jnp.arange(half, dtype=jnp.float32) * (-math.log(max_period)) / (half - freq_shift)
  angles_BF = t_B.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles_BF), jnp.cos(angles_BF)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def nearest_resize(x_BHWC: jax.Array, height: int, width: int) -> jax.Array:
  """Nearest-neighbour resize with PyTorch's `F.interpolate(mode='nearest')` index rule."""
  _, h, w, _ = x_BHWC.shape
  if (height, width) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)

  def index(n_in: int, n_out: int) -> np.ndarray:
    # torch: src = min(floor(dst * float32(in / out)), in - 1), in float32 arithmetic.
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, n_in - 1)

  return x_BHWC[:, index(h, height)][:, :, index(w, width)]


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2 on the sinusoidal features."""

  def __init__(self, in_features: int, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.linear_1 = layers.dense(in_features, dim, (None, "time"), dtype=dtype, rngs=rngs)
    self.linear_2 = layers.dense(dim, dim, ("time", None), dtype=dtype, rngs=rngs)

  def __call__(self, feats_BF: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.silu(self.linear_1(feats_BF)))


class ResnetBlock2D(nnx.Module):
  """GN-SiLU-conv, + time projection, GN-SiLU-conv, plus a (1x1 as dense) shortcut."""

  def __init__(self, in_ch: int, out_ch: int, temb_ch: int, *, groups: int, eps: float,
               dtype: Any, rngs: nnx.Rngs):
    self.norm1 = layers.group_norm(in_ch, groups, eps=eps, dtype=dtype, rngs=rngs)
    self.conv1 = layers.conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
    self.time_emb_proj = layers.dense(temb_ch, out_ch, (None, "conv_out"), dtype=dtype,
                                      rngs=rngs)
    self.norm2 = layers.group_norm(out_ch, groups, eps=eps, dtype=dtype, rngs=rngs)
    self.conv2 = layers.conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (layers.dense(in_ch, out_ch, ("conv_in", "conv_out"), dtype=dtype,
                                       rngs=rngs) if in_ch != out_ch else None)

  def __call__(self, x_BHWC: jax.Array, temb_BT: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
    h = h + self.time_emb_proj(jax.nn.silu(temb_BT))[:, None, None, :]
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x_BHWC = self.conv_shortcut(x_BHWC)
    return sharding.shard_batch(x_BHWC + h)


class Attention(nnx.Module):
  """Multi-head attention without q/k/v biases; `kv_dim` is the context width for cross-attn."""

  def __init__(self, dim: int, kv_dim: int, heads: int, *, kv_axis: str, upcast: bool,
               dtype: Any, rngs: nnx.Rngs):
    self.heads = heads
    self.upcast = upcast
    self.to_q = layers.dense(dim, dim, ("embed", "heads"), dtype=dtype, rngs=rngs,
                             use_bias=False)
    self.to_k = layers.dense(kv_dim, dim, (kv_axis, "heads"), dtype=dtype, rngs=rngs,
                             use_bias=False)
    self.to_v = layers.dense(kv_dim, dim, (kv_axis, "heads"), dtype=dtype, rngs=rngs,
                             use_bias=False)
    self.to_out = layers.dense(dim, dim, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x_BLD: jax.Array, ctx_BSE: jax.Array) -> jax.Array:
    b, l, d = x_BLD.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1)
    out_BLHK = attention.attention(split(self.to_q(x_BLD)), split(self.to_k(ctx_BSE)),
                                split(self.to_v(ctx_BSE)), upcast=self.upcast)
    return self.to_out(out_BLHK.reshape(b, l, d))


class FeedForward(nnx.Module):
  """GEGLU feed-forward, hidden width 4 * dim (diffusers `ff.net.0.proj`, `ff.net.2`)."""

  def __init__(self, dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.proj = layers.dense(dim, 8 * dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.out = layers.dense(4 * dim, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    h, gate = jnp.split(self.proj(x_BLD), 2, axis=-1)
    return self.out(h * layers.gelu(gate))


class BasicTransformerBlock(nnx.Module):
  """Pre-LN self-attention, cross-attention to the context, and GEGLU feed-forward."""

  def __init__(self, dim: int, heads: int, cross_dim: int, *, upcast: bool, dtype: Any,
               rngs: nnx.Rngs):
    ln = lambda: layers.layer_norm(dim, eps=_TRANSFORMER_LN_EPS, dtype=dtype, rngs=rngs)
    self.norm1 = ln()
    self.attn1 = Attention(dim, dim, heads, kv_axis="embed", upcast=upcast, dtype=dtype,
                           rngs=rngs)
    self.norm2 = ln()
    self.attn2 = Attention(dim, cross_dim, heads, kv_axis="cross", upcast=upcast, dtype=dtype,
                           rngs=rngs)
    self.norm3 = ln()
    self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

  def __call__(self, x_BLD: jax.Array, ctx_BSE: jax.Array) -> jax.Array:
    h = self.norm1(x_BLD)
    x_BLD = x_BLD + self.attn1(h, h)
    x_BLD = x_BLD + self.attn2(self.norm2(x_BLD), ctx_BSE)
    return x_BLD + self.ff(self.norm3(x_BLD))


class Transformer2DModel(nnx.Module):
  """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, residual."""

  def __init__(self, channels: int, heads: int, depth: int, cross_dim: int, *, groups: int,
               upcast: bool, dtype: Any, rngs: nnx.Rngs):
    self.norm = layers.group_norm(channels, groups, eps=_TRANSFORMER_GN_EPS, dtype=dtype,
                                  rngs=rngs)
    # Conv 1x1 (SD 1.x) or Linear (SD 2.x) in diffusers: the same dense map on NHWC.
    self.proj_in = layers.dense(channels, channels, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(channels, heads, cross_dim, upcast=upcast, dtype=dtype, rngs=rngs)
        for _ in range(depth)])
    self.proj_out = layers.dense(channels, channels, ("heads", "embed"), dtype=dtype,
                                 rngs=rngs)

  def __call__(self, x_BHWC: jax.Array, ctx_BSE: jax.Array) -> jax.Array:
    b, h, w, c = x_BHWC.shape
    tokens_BLD = self.proj_in(self.norm(x_BHWC)).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      tokens_BLD = block(tokens_BLD, ctx_BSE)
    return sharding.shard_batch(x_BHWC + self.proj_out(tokens_BLD).reshape(b, h, w, c))


class Downsample(nnx.Module):
  """3x3 conv with stride 2; padding 0 means diffusers' asymmetric (0, 1) pad."""

  def __init__(self, channels: int, padding: int, *, dtype: Any, rngs: nnx.Rngs):
    pad = ((0, 1), (0, 1)) if padding == 0 else ((padding, padding),) * 2
    self.conv = layers.conv(channels, channels, 3, stride=2, padding=pad, dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return sharding.shard_batch(self.conv(x_BHWC))


class Upsample(nnx.Module):
  """Nearest-neighbour upsampling to the skip connection's size (x2 unless odd), then 3x3 conv."""

  def __init__(self, channels: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = layers.conv(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array, height: int, width: int) -> jax.Array:
    return sharding.shard_batch(self.conv(nearest_resize(x_BHWC, height, width)))
