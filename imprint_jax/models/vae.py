"""Stable Diffusion's VAE (diffusers `AutoencoderKL`) as a Flax NNX module, NHWC.

The layer structure and submodule names follow diffusers (`encoder.down_blocks.0.resnets.1`,
`decoder.mid_block.attentions.0.to_q`, `quant_conv`, ...), so the weight converter in
`imprint_jax/convert/vae.py` is a plain name table. Only the SD-family layout is supported:
`DownEncoderBlock2D` / `UpDecoderBlock2D` blocks, SiLU, GroupNorm.

Latent scaling is the caller's job: `encode`/`decode` work on unscaled latents, as diffusers'
`AutoencoderKL.encode(x).latent_dist` and `.decode(z)` do; `encode_latents`/`decode_latents`
apply `scaling_factor` (what the UNet sees).

Parameters are float32; `VAEConfig.dtype` is the compute dtype. GroupNorm statistics are always
computed in float32 (flax promotes half-precision inputs for the reductions), attention softmax
in float32 (diffusers' `upcast_softmax=True`), and the public methods return float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.models import attention, layers

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
_EPS = 1e-6  # every GroupNorm of the SD VAE
# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an SD-family AutoencoderKL (the fields of its diffusers config.json, read
  and written by `convert.vae.config_from_diffusers` / `config_to_diffusers`)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  sample_size: int = 512
  dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if self.shift_factor is not None:
      raise UserError(f"VAE shift_factor={self.shift_factor}: latent shifting (SD3/Flux VAEs) is"
                      " not supported; only SD 1.x/2.x-family VAEs (shift_factor null) are")
    if not self.block_out_channels:
      raise UserError("VAE block_out_channels is empty")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise UserError(f"VAE block_out_channels {self.block_out_channels}: {c} is not divisible"
                        f" by norm_num_groups={self.norm_num_groups}")
    if self.layers_per_block < 1:
      raise UserError(f"VAE layers_per_block={self.layers_per_block}: must be at least 1")
    layers.compute_dtype(self.dtype)
    layers.remat_policy_check(self.remat)

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def sd(cls, **overrides: Any) -> VAEConfig:
    """The SD 1.x / 2.x VAE (83.7M parameters, 8x downsampling, 4 latent channels)."""
    return cls(**overrides)


# ----------------------------------------------------------------------------- blocks

class ResnetBlock(nnx.Module):
  """diffusers `ResnetBlock2D` without a time embedding: GN-SiLU-conv twice, plus the skip."""

  def __init__(self, in_ch: int, out_ch: int, groups: int, *, dtype: Any, rngs: nnx.Rngs):
    self.norm1 = layers.group_norm(in_ch, groups, eps=_EPS, dtype=dtype, rngs=rngs)
    self.conv1 = layers.conv(in_ch, out_ch, 3, dtype=dtype, rngs=rngs)
    self.norm2 = layers.group_norm(out_ch, groups, eps=_EPS, dtype=dtype, rngs=rngs)
    self.conv2 = layers.conv(out_ch, out_ch, 3, dtype=dtype, rngs=rngs)
    self.conv_shortcut = (layers.conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs)
                          if in_ch != out_ch else None)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x_BHWC)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)
    return skip + h


class Downsample(nnx.Module):
  """3x3 stride-2 conv. diffusers pads (0, 1, 0, 1) - bottom/right only - then convolves with
  padding 0; that is the same as asymmetric conv padding ((0, 1), (0, 1))."""

  def __init__(self, ch: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    return self.conv(x_BHWC)


class Upsample(nnx.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  def __init__(self, ch: int, *, dtype: Any, rngs: nnx.Rngs):
    self.conv = layers.conv(ch, ch, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)
    return self.conv(x)


class Attention(nnx.Module):
  """The mid-block self-attention: GroupNorm, one head over all H*W positions, residual."""

  def __init__(self, ch: int, groups: int, *, dtype: Any, rngs: nnx.Rngs):
    self.group_norm = layers.group_norm(ch, groups, eps=_EPS, dtype=dtype, rngs=rngs)
    kw = {"dtype": dtype, "rngs": rngs}
    self.to_q = layers.dense(ch, ch, ("embed", "heads"), **kw)
    self.to_k = layers.dense(ch, ch, ("embed", "heads"), **kw)
    self.to_v = layers.dense(ch, ch, ("embed", "heads"), **kw)
    # A one-element list so the parameter path reads `to_out.0`, as in diffusers.
    self.to_out = nnx.List([layers.dense(ch, ch, ("heads", "embed"), **kw)])

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    b, h, w, c = x_BHWC.shape
    tokens_BLC = self.group_norm(x_BHWC).reshape(b, h * w, c)
    q, k, v = (proj(tokens_BLC)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
    out_BLC = attention.attention(q, k, v, upcast=True).reshape(b, h * w, c)
    out_BHWC = self.to_out[0](out_BLC).reshape(b, h, w, c)
    return x_BHWC + out_BHWC


class MidBlock(nnx.Module):
  """resnet, [attention], resnet at the lowest resolution (diffusers `UNetMidBlock2D`)."""

  def __init__(self, ch: int, groups: int, add_attention: bool, *, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(ch, ch, groups, dtype=dtype, rngs=rngs)
                             for _ in range(2)])
    self.attentions = nnx.List(
        [Attention(ch, groups, dtype=dtype, rngs=rngs)] if add_attention else [])

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    x = self.resnets[0](x_BHWC)
    if len(self.attentions):
      x = self.attentions[0](x)
    return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
  def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_downsample: bool,
               *, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups,
                                         dtype=dtype, rngs=rngs) for i in range(num_layers)])
    self.downsamplers = nnx.List(
        [Downsample(out_ch, dtype=dtype, rngs=rngs)] if add_downsample else [])

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x_BHWC = resnet(x_BHWC)
    for down in self.downsamplers:
      x_BHWC = down(x_BHWC)
    return x_BHWC


class UpDecoderBlock(nnx.Module):
  def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_upsample: bool,
               *, dtype: Any, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups,
                                         dtype=dtype, rngs=rngs) for i in range(num_layers)])
    self.upsamplers = nnx.List(
        [Upsample(out_ch, dtype=dtype, rngs=rngs)] if add_upsample else [])

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x_BHWC = resnet(x_BHWC)
    for up in self.upsamplers:
      x_BHWC = up(x_BHWC)
    return x_BHWC


class Encoder(nnx.Module):
  """Image (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments, f = 2^(n-1)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dtype, boc, g = layers.compute_dtype(cfg.dtype), cfg.block_out_channels, cfg.norm_num_groups
    self.remat = cfg.remat
    self.conv_in = layers.conv(cfg.in_channels, boc[0], 3, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List([
        DownEncoderBlock(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g,
                         add_downsample=i < len(boc) - 1, dtype=dtype, rngs=rngs)
        for i in range(len(boc))])
    self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
    self.conv_norm_out = layers.group_norm(boc[-1], g, eps=_EPS, dtype=dtype, rngs=rngs)
    self.conv_out = layers.conv(boc[-1], 2 * cfg.latent_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    h = self.conv_in(x_BHWC)
    for block in self.down_blocks:
      h = layers.call_block(block, h, remat=self.remat)
    h = layers.call_block(self.mid_block, h, remat=self.remat)
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
  """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    dtype, boc, g = layers.compute_dtype(cfg.dtype), cfg.block_out_channels, cfg.norm_num_groups
    self.remat = cfg.remat
    self.conv_in = layers.conv(cfg.latent_channels, boc[-1], 3, dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
    rev = boc[::-1]
    self.up_blocks = nnx.List([
        UpDecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g,
                       add_upsample=i < len(rev) - 1, dtype=dtype, rngs=rngs)
        for i in range(len(rev))])
    self.conv_norm_out = layers.group_norm(boc[0], g, eps=_EPS, dtype=dtype, rngs=rngs)
    self.conv_out = layers.conv(boc[0], cfg.out_channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, z_BhwC: jax.Array) -> jax.Array:
    h = self.conv_in(z_BhwC)
    h = layers.call_block(self.mid_block, h, remat=self.remat)
    for block in self.up_blocks:
      h = layers.call_block(block, h, remat=self.remat)
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
  """The KL-regularised autoencoder of latent diffusion (diffusers `AutoencoderKL`), NHWC."""

  def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, lc = layers.compute_dtype(cfg.dtype), cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = (layers.conv(2 * lc, 2 * lc, 1, dtype=dtype, rngs=rngs)
                       if cfg.use_quant_conv else None)
    self.post_quant_conv = (layers.conv(lc, lc, 1, dtype=dtype, rngs=rngs)
                            if cfg.use_post_quant_conv else None)

  def encode(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images in [-1, 1], (B, H, W, 3) -> posterior (mean, logvar), each (B, H/8, W/8, 4).

    Unscaled latents (multiply by `scaling_factor` for the UNet); logvar clipped to
    [-30, 20] like diffusers' `DiagonalGaussianDistribution`. Both float32.
    """
    _check_rank(x_BHWC, "encode")
    h = self.encoder(x_BHWC.astype(layers.compute_dtype(self.cfg.dtype)))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z_BhwC: jax.Array) -> jax.Array:
    """Unscaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3), about [-1, 1], float32."""
    _check_rank(z_BhwC, "decode")
    z = z_BhwC.astype(layers.compute_dtype(self.cfg.dtype))
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  @staticmethod
  def sample(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1)."""
    # Drawn flat: the same values as normal(rng, mean.shape), compiled much faster by XLA.
    noise = jax.random.normal(rng, (mean.size,), jnp.float32).reshape(mean.shape)
    return mean + jnp.exp(0.5 * logvar) * noise

  def encode_latents(self, x_BHWC: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images in [-1, 1] -> scaled latents for the UNet (posterior mean when `rng` is None)."""
    mean, logvar = self.encode(x_BHWC)
    z = mean if rng is None else self.sample(rng, mean, logvar)
    return z * self.cfg.scaling_factor

  def decode_latents(self, z_scaled_BhwC: jax.Array) -> jax.Array:
    """Scaled latents (what the UNet produces) -> images, about [-1, 1]."""
    return self.decode(z_scaled_BhwC / self.cfg.scaling_factor)


def _check_rank(x: jax.Array, what: str) -> None:
  if x.ndim != 4:
    raise UserError(f"VAE {what}: expected an NHWC batch of rank 4, got shape {x.shape}")
