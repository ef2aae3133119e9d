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

This file holds the config, the down/mid/up blocks and the UNet; the layers they are built of
(resnets, transformers, samplers, the timestep embedding) are in models/unet_blocks.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.models import layers
from imprint_jax.models.unet_blocks import (Downsample, ResnetBlock2D, TimestepEmbedding,
                                            Transformer2DModel, Upsample, timestep_embedding)

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)
ACTIVATIONS = ("silu", "swish")


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


def _make(rngs: nnx.Rngs | None, build: Callable[[nnx.Rngs], Any]) -> Any:
  """`build(rngs)`, or with `rngs=None` its shape-only version (parameters are ShapeDtypeStructs).

  Shape-only sub-modules are traced one at a time: nnx's RNG bookkeeping makes a single trace of
  a whole UNet quadratic in its size (11 s for SD 1.5 on CPU, against 2 s this way).
  """
  if rngs is None:
    return nnx.eval_shape(lambda: build(layers.init_rngs(0)))
  return build(rngs)


# ============================================================================ blocks

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
