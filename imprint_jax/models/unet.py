"""The Stable Diffusion UNet (SD 1.x / 2.x family) in Flax NNX, NHWC.

Numerically the same network as diffusers' `UNet2DConditionModel` with the block types SD uses
(CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D, UpBlock2D).
Attribute names follow diffusers (`conv_in`, `time_embedding`, `down_blocks[i].resnets[j]`,
`mid_block`, `up_blocks[i].attentions[j].transformer_blocks[k].attn2`, ...) so training code can
select parameters by path (e.g. everything under `up_blocks`). Where diffusers keeps a single
layer in a one-element list (`downsamplers.0`, `upsamplers.0`, `to_out.0`, `ff.net.0/2`) we use
a plain attribute (`downsampler`, `upsampler`, `to_out`, `ff.proj`/`ff.out`); the converter
table (`convert/unet.py`) maps the names.

1x1 convolutions (resnet shortcuts, the transformers' conv `proj_in`/`proj_out` of SD 1.x) are
dense layers over the channel axis: the same math, and a plain matmul on TPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.models import attention, layers
from imprint_jax.parallel import sharding

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)
ACTIVATIONS = ("silu", "swish")

# diffusers' GroupNorm in Transformer2DModel has a fixed eps, independent of `norm_eps`.
_TRANSFORMER_GN_EPS = 1e-6
_TRANSFORMER_LN_EPS = 1e-5


def _per_block(value: Any, n: int, name: str) -> tuple:
  """An int (or bool) broadcast to `n` blocks, or a length-`n` sequence as a tuple."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise UserError(f"UNet config: {name}={list(value)} has {len(value)} entries, but there"
                      f" are {n} down blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The architecture of a SD-family UNet, in diffusers' terms (read from and written to a
  diffusers config.json by `convert.unet.config_from_diffusers` / `config_to_diffusers`).

  `attention_head_dim` follows diffusers' legacy naming: when `num_attention_heads` is None (every
  SD checkpoint) it is the NUMBER of heads per block, and the head width is channels // heads.
  `dtype` is the compute dtype (params stay float32); `remat` a `layers.REMAT_POLICIES` name
  applied to each down/mid/up block.
  """
  in_channels: int = 4
  out_channels: int = 4
  sample_size: int | tuple[int, int] = 64
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                       "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                     "CrossAttnUpBlock2D")
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  layers_per_block: int = 2
  attention_head_dim: int | tuple[int, ...] = 8
  num_attention_heads: int | tuple[int, ...] | None = None
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  upcast_attention: bool = False
  only_cross_attention: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  act_fn: str = "silu"
  transformer_layers_per_block: int | tuple[int, ...] = 1
  downsample_padding: int = 1
  center_input_sample: bool = False
  dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    n = len(self.block_out_channels)
    if n < 1:
      raise UserError("UNet config: block_out_channels is empty")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise UserError(
          f"UNet config: {n} block_out_channels but {len(self.down_block_types)}"
          f" down_block_types and {len(self.up_block_types)} up_block_types; they must match")
    for t in self.down_block_types:
      if t not in DOWN_TYPES:
        raise UserError(f"UNet config: down_block_types entry {t!r} is not supported"
                        f" (supported: {', '.join(DOWN_TYPES)})")
    for t in self.up_block_types:
      if t not in UP_TYPES:
        raise UserError(f"UNet config: up_block_types entry {t!r} is not supported"
                        f" (supported: {', '.join(UP_TYPES)})")
    if self.mid_block_type not in MID_TYPES:
      raise UserError(f"UNet config: mid_block_type {self.mid_block_type!r} is not supported"
                      f" (supported: {', '.join(MID_TYPES)})")
    if self.only_cross_attention:
      raise UserError("UNet config: only_cross_attention=True is not supported (SD UNets use"
                      " self- and cross-attention)")
    if self.act_fn not in ACTIVATIONS:
      raise UserError(f"UNet config: act_fn {self.act_fn!r} is not supported"
                      f" (supported: {', '.join(ACTIVATIONS)})")
    if not isinstance(self.layers_per_block, int) or self.layers_per_block < 1:
      raise UserError(f"UNet config: layers_per_block={self.layers_per_block!r} must be an"
                      " int >= 1")
    layers.compute_dtype(self.dtype)
    layers.remat_policy_check(self.remat)
    for i, c in enumerate(self.block_out_channels):
      if c % self.norm_num_groups:
        raise UserError(f"UNet config: block_out_channels[{i}]={c} is not divisible by"
                        f" norm_num_groups={self.norm_num_groups}")
      if c % self.heads[i]:
        raise UserError(f"UNet config: block_out_channels[{i}]={c} is not divisible by its"
                        f" {self.heads[i]} attention heads")
    for x in self.transformer_depths:
      if not isinstance(x, int) or x < 1:
        raise UserError(f"UNet config: transformer_layers_per_block entry {x!r} must be an"
                        " int >= 1")

  # ------------------------------------------------------------------ derived, per down block

  @property
  def heads(self) -> tuple[int, ...]:
    """Attention heads per down block (diffusers: `num_attention_heads or attention_head_dim`)."""
    n = len(self.block_out_channels)
    value = self.num_attention_heads or self.attention_head_dim
    return _per_block(value, n, "num_attention_heads" if self.num_attention_heads
                      else "attention_head_dim")

  @property
  def transformer_depths(self) -> tuple[int, ...]:
    return _per_block(self.transformer_layers_per_block, len(self.block_out_channels),
                      "transformer_layers_per_block")

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  def replace(self, **changes: Any) -> UNetConfig:
    return dataclasses.replace(self, **changes)

  # ------------------------------------------------------------------ presets

  @classmethod
  def sd15(cls, **overrides: Any) -> UNetConfig:
    """Stable Diffusion 1.5 (also 1.4): conv projections, 8 heads everywhere, CLIP-L context."""
    return cls(**overrides)

  @classmethod
  def sd21(cls, **overrides: Any) -> UNetConfig:
    """Stable Diffusion 2.1 (768-v): linear projections, 5/10/20/20 heads of width 64, OpenCLIP-H
    context, attention upcast to float32."""
    base = dict(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                use_linear_projection=True, upcast_attention=True)
    return cls(**{**base, **overrides})


# ============================================================================ functions

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


def _nearest_resize(x_BHWC: jax.Array, height: int, width: int) -> jax.Array:
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


def _make(rngs: nnx.Rngs | None, build: Callable[[nnx.Rngs], Any]) -> Any:
  """`build(rngs)`, or with `rngs=None` its shape-only version (parameters are ShapeDtypeStructs).

  Shape-only sub-modules are traced one at a time: nnx's RNG bookkeeping makes a single trace of
  a whole UNet quadratic in its size (11 s for SD 1.5 on CPU, against 2 s this way).
  """
  if rngs is None:
    return nnx.eval_shape(lambda: build(layers.init_rngs(0)))
  return build(rngs)


# ============================================================================ blocks

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
    return sharding.shard_batch(self.conv(_nearest_resize(x_BHWC, height, width)))


class DownBlock(nnx.Module):
  """CrossAttnDownBlock2D (with `attentions`) or DownBlock2D (`attentions` is None)."""

  def __init__(self, cfg: UNetConfig, i: int, in_ch: int, *, dtype: Any,
               rngs: nnx.Rngs | None):
    out_ch = cfg.block_out_channels[i]
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype)
    self.resnets = nnx.List([
        _make(rngs, lambda r, c=(in_ch if j == 0 else out_ch): ResnetBlock2D(
            c, out_ch, cfg.time_embed_dim, rngs=r, **kw))
        for j in range(cfg.layers_per_block)])
    self.attentions = nnx.List([
        _make(rngs, lambda r: Transformer2DModel(
            out_ch, cfg.heads[i], cfg.transformer_depths[i], cfg.cross_attention_dim,
            groups=cfg.norm_num_groups, upcast=cfg.upcast_attention, dtype=dtype, rngs=r))
        for _ in range(cfg.layers_per_block)
    ]) if cfg.down_block_types[i] == "CrossAttnDownBlock2D" else None
    last = i == len(cfg.block_out_channels) - 1
    self.downsampler = None if last else _make(
        rngs, lambda r: Downsample(out_ch, cfg.downsample_padding, dtype=dtype, rngs=r))

  def __call__(self, x_BHWC: jax.Array, temb_BT: jax.Array, ctx_BSE: jax.Array
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Returns the block output and the skip connections it leaves for the up path."""
    skips = []
    for j, resnet in enumerate(self.resnets):
      x_BHWC = resnet(x_BHWC, temb_BT)
      if self.attentions is not None:
        x_BHWC = self.attentions[j](x_BHWC, ctx_BSE)
      skips.append(x_BHWC)
    if self.downsampler is not None:
      x_BHWC = self.downsampler(x_BHWC)
      skips.append(x_BHWC)
    return x_BHWC, tuple(skips)


class MidBlock(nnx.Module):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

  def __init__(self, cfg: UNetConfig, *, dtype: Any, rngs: nnx.Rngs | None):
    ch = cfg.block_out_channels[-1]
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype)
    self.resnets = nnx.List([
        _make(rngs, lambda r: ResnetBlock2D(ch, ch, cfg.time_embed_dim, rngs=r, **kw))
        for _ in range(2)])
    self.attentions = nnx.List([_make(rngs, lambda r: Transformer2DModel(
        ch, cfg.heads[-1], cfg.transformer_depths[-1], cfg.cross_attention_dim,
        groups=cfg.norm_num_groups, upcast=cfg.upcast_attention, dtype=dtype, rngs=r))])

  def __call__(self, x_BHWC: jax.Array, temb_BT: jax.Array, ctx_BSE: jax.Array) -> jax.Array:
    x_BHWC = self.resnets[0](x_BHWC, temb_BT)
    x_BHWC = self.attentions[0](x_BHWC, ctx_BSE)
    return self.resnets[1](x_BHWC, temb_BT)


class UpBlock(nnx.Module):
  """CrossAttnUpBlock2D (with `attentions`) or UpBlock2D (`attentions` is None).

  `i` counts up blocks from the bottom (diffusers' order: up_blocks[0] is the lowest resolution).
  """

  def __init__(self, cfg: UNetConfig, i: int, *, dtype: Any, rngs: nnx.Rngs | None):
    n = len(cfg.block_out_channels)
    rev = cfg.block_out_channels[::-1]
    out_ch, prev_ch = rev[i], rev[max(i - 1, 0)]
    skip_in_ch = rev[min(i + 1, n - 1)]  # channels of the deepest skip this block consumes
    num = cfg.layers_per_block + 1
    kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype)
    in_chs = [(prev_ch if j == 0 else out_ch) + (skip_in_ch if j == num - 1 else out_ch)
              for j in range(num)]
    self.resnets = nnx.List([
        _make(rngs, lambda r, c=c: ResnetBlock2D(c, out_ch, cfg.time_embed_dim, rngs=r, **kw))
        for c in in_chs])
    self.attentions = nnx.List([
        _make(rngs, lambda r: Transformer2DModel(
            out_ch, cfg.heads[::-1][i], cfg.transformer_depths[::-1][i],
            cfg.cross_attention_dim, groups=cfg.norm_num_groups, upcast=cfg.upcast_attention,
            dtype=dtype, rngs=r))
        for _ in range(num)
    ]) if cfg.up_block_types[i] == "CrossAttnUpBlock2D" else None
    self.upsampler = None if i == n - 1 else _make(
        rngs, lambda r: Upsample(out_ch, dtype=dtype, rngs=r))

  def __call__(self, x_BHWC: jax.Array, skips: Sequence[jax.Array], temb_BT: jax.Array,
               ctx_BSE: jax.Array, size_like_BHWC: jax.Array | None) -> jax.Array:
    """`skips` in down-path order (consumed from the end); the upsampler produces the spatial
    size of `size_like_BHWC` (the next block's skip), as diffusers does for odd sizes."""
    skips = list(skips)
    for j, resnet in enumerate(self.resnets):
      x_BHWC = jnp.concatenate([x_BHWC, skips.pop().astype(x_BHWC.dtype)], axis=-1)
      x_BHWC = resnet(x_BHWC, temb_BT)
      if self.attentions is not None:
        x_BHWC = self.attentions[j](x_BHWC, ctx_BSE)
    if self.upsampler is not None:
      x_BHWC = self.upsampler(x_BHWC, size_like_BHWC.shape[1], size_like_BHWC.shape[2])
    return x_BHWC


# ============================================================================ the UNet

class UNet2DCondition(nnx.Module):
  """The SD UNet: (noisy latents, timesteps, context tokens) -> predicted noise (or v).

  Params are float32; `cfg.dtype` is the compute dtype (GroupNorm/LayerNorm statistics and the
  timestep features stay float32); `cfg.remat` checkpoints each down/mid/up block.
  """

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs | None):
    """`rngs=None` builds shape-only parameters (see `abstract_unet`)."""
    self.cfg = cfg
    dtype = layers.compute_dtype(cfg.dtype)
    ch0 = cfg.block_out_channels[0]
    self.conv_in = _make(rngs, lambda r: layers.conv(cfg.in_channels, ch0, 3, dtype=dtype,
                                                     rngs=r))
    self.time_embedding = _make(rngs, lambda r: TimestepEmbedding(
        ch0, cfg.time_embed_dim, dtype=dtype, rngs=r))
    down = []
    in_ch = ch0
    for i in range(len(cfg.block_out_channels)):
      down.append(DownBlock(cfg, i, in_ch, dtype=dtype, rngs=rngs))
      in_ch = cfg.block_out_channels[i]
    self.down_blocks = nnx.List(down)
    self.mid_block = MidBlock(cfg, dtype=dtype, rngs=rngs)
    self.up_blocks = nnx.List([UpBlock(cfg, i, dtype=dtype, rngs=rngs)
                               for i in range(len(cfg.block_out_channels))])
    self.conv_norm_out = _make(rngs, lambda r: layers.group_norm(
        ch0, cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype, rngs=r))
    self.conv_out = _make(rngs, lambda r: layers.conv(ch0, cfg.out_channels, 3, dtype=dtype,
                                                      rngs=r))

  def __call__(self, x_BHWC: jax.Array, t_B: jax.Array | int | float,
               ctx_BLD: jax.Array) -> jax.Array:
    """x_BHWC: (B, H, W, in_channels) latents; t_B: (B,) or scalar timesteps (int or float);
    ctx_BLD: (B, L, cross_attention_dim) context tokens. Returns (B, H, W, out_channels) float32.
    """
    cfg = self.cfg
    if x_BHWC.shape[-1] != cfg.in_channels:
      raise ValueError(f"UNet expects {cfg.in_channels} input channels, got {x_BHWC.shape}")
    if cfg.center_input_sample:
      x_BHWC = 2 * x_BHWC - 1.0
    t_B = jnp.broadcast_to(jnp.asarray(t_B), (x_BHWC.shape[0],))
    feats_BF = timestep_embedding(t_B, cfg.block_out_channels[0],
                                  flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
    temb_BT = self.time_embedding(feats_BF)

    x_BHWC = self.conv_in(x_BHWC)
    skips = [x_BHWC]
    for block in self.down_blocks:
      x_BHWC, block_skips = layers.call_block(block, x_BHWC, temb_BT, ctx_BLD, remat=cfg.remat)
      skips.extend(block_skips)
    x_BHWC = layers.call_block(self.mid_block, x_BHWC, temb_BT, ctx_BLD, remat=cfg.remat)
    for block in self.up_blocks:
      n = len(block.resnets)
      block_skips, skips = tuple(skips[-n:]), skips[:-n]
      size_like = skips[-1] if block.upsampler is not None else None
      x_BHWC = layers.call_block(block, x_BHWC, block_skips, temb_BT, ctx_BLD, size_like,
                                 remat=cfg.remat)
    x_BHWC = self.conv_out(jax.nn.silu(self.conv_norm_out(x_BHWC)))
    return x_BHWC.astype(jnp.float32)


def abstract_unet(cfg: UNetConfig) -> UNet2DCondition:
  """The UNet with shape-only parameters (no memory); fill it with `load_into`/`set_value`."""
  return UNet2DCondition(cfg, rngs=None)


def widen_conv_in(unet: UNet2DCondition, in_channels: int = 9) -> UNet2DCondition:
  """A UNet whose conv_in takes `in_channels` inputs: the pretrained ones first, the rest zero.

  With zero weights on the extra channels the new UNet computes exactly what the old one did,
  whatever those channels hold (IMPRINT: latent 4 + masked-background latent 4 + mask 1 = 9).
  All other parameters are the same (immutable) arrays as in `unet`.
  """
  old_in = unet.cfg.in_channels
  if in_channels < old_in:
    raise UserError(f"widen_conv_in: in_channels={in_channels} is less than the UNet's"
                    f" {old_in}")
  new = abstract_unet(unet.cfg.replace(in_channels=in_channels))
  old_leaves = dict(nnx.to_flat_state(nnx.state(unet, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(new, nnx.Param)):
    value = old_leaves[path].get_value()
    if path == ("conv_in", "kernel"):  # HWIO: pad the input-channel axis with zeros
      value = jnp.pad(value, ((0, 0), (0, 0), (0, in_channels - old_in), (0, 0)))
    var.set_value(value)
  return new
