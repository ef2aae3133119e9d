"""The whole IMPRINT model: DINOv2 + content adapter (the image encoder), UNet, VAE.

The image encoder replaces Stable Diffusion's text encoder: its tokens go into the UNet's
cross-attention. Stage 1 uses a 4-channel UNet (generate view j of the segmented object);
stage 2 a 9-channel one whose input is [noisy latent (4), masked-background latent (4),
coarse mask (1)] concatenated on channels, in that order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.models.adapter import AdapterConfig, ContentAdapter
from imprint_jax.models.dinov2 import Dinov2, Dinov2Config
from imprint_jax.models.unet import UNet2DCondition, UNetConfig
from imprint_jax.models.vae import AutoencoderKL, VAEConfig


@dataclasses.dataclass(frozen=True)
class ImprintConfig:
  dinov2: Dinov2Config
  adapter: AdapterConfig
  unet: UNetConfig
  vae: VAEConfig

  def __post_init__(self):
    if self.adapter.in_dim != self.dinov2.hidden_size:
      raise UserError(f"adapter in_dim {self.adapter.in_dim} != DINOv2 width"
                      f" {self.dinov2.hidden_size}")
    if self.adapter.out_dim != self.unet.cross_attention_dim:
      raise UserError(f"adapter out_dim {self.adapter.out_dim} != UNet cross_attention_dim"
                      f" {self.unet.cross_attention_dim}")
    if self.unet.in_channels not in (self.vae.latent_channels,
                                     2 * self.vae.latent_channels + 1):
      raise UserError(f"UNet in_channels {self.unet.in_channels}: expected"
                      f" {self.vae.latent_channels} (stage 1) or"
                      f" {2 * self.vae.latent_channels + 1} (stage 2)")

  @property
  def stage(self) -> int:
    return 1 if self.unet.in_channels == self.vae.latent_channels else 2

  def to_dict(self) -> dict[str, Any]:
    return {k: dataclasses.asdict(getattr(self, k)) for k in ("dinov2", "adapter", "unet", "vae")}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ImprintConfig":
    def build(klass, sub):
      fields = {f.name for f in dataclasses.fields(klass)}
      unknown = set(sub) - fields
      if unknown:
        raise UserError(f"{klass.__name__}: unknown field {sorted(unknown)[0]!r}")
      return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()})
    try:
      return cls(dinov2=build(Dinov2Config, d["dinov2"]),
                 adapter=build(AdapterConfig, d["adapter"]),
                 unet=build(UNetConfig, d["unet"]), vae=build(VAEConfig, d["vae"]))
    except KeyError as e:
      raise UserError(f"model config lacks the {e.args[0]!r} section") from None

  def with_dtype(self, dtype: str, remat: str | None = None) -> "ImprintConfig":
    """The same model computing in `dtype` (and with remat policy `remat` on the trained nets)."""
    def r(c, use_remat=True):
      kw = {"dtype": dtype}
      if remat is not None and use_remat:
        kw["remat"] = remat
      return dataclasses.replace(c, **kw)
    return dataclasses.replace(self, dinov2=r(self.dinov2), adapter=r(self.adapter),
                               unet=r(self.unet), vae=r(self.vae, use_remat=False))


class Imprint(nnx.Module):
  """Container of the four networks; attribute names define the parameter paths
  ('dinov2', 'adapter', 'unet', 'vae') that training labels and checkpoints use."""

  def __init__(self, cfg: ImprintConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dinov2 = Dinov2(cfg.dinov2, rngs=rngs)
    self.adapter = ContentAdapter(cfg.adapter, rngs=rngs)
    self.unet = UNet2DCondition(cfg.unet, rngs=rngs)
    self.vae = AutoencoderKL(cfg.vae, rngs=rngs)

  def encode_object(self, pixels_BHWC: jax.Array) -> jax.Array:
    """Normalised object pixels (B, E, E, 3) -> cross-attention context (B, L, C)."""
    return self.adapter(self.dinov2(pixels_BHWC))

  def unet_input(self, x_t: jax.Array, background_latent: jax.Array | None,
                 mask_latent: jax.Array | None) -> jax.Array:
    """Stage 1: the noisy latent alone; stage 2: [x_t, background latent, mask] on channels."""
    if self.cfg.stage == 1:
      return x_t
    return jnp.concatenate([x_t, background_latent.astype(x_t.dtype),
                            mask_latent.astype(x_t.dtype)], axis=-1)


def mask_to_latent(mask_BHW1: jax.Array, factor: int) -> jax.Array:
  """Pixel mask -> latent-resolution mask by max-pooling over factor x factor cells, so every
  latent cell touching the generation region is marked (nearest sampling can miss thin parts)."""
  b, h, w, c = mask_BHW1.shape
  if h % factor or w % factor:
    raise UserError(f"mask size {h}x{w} is not a multiple of the VAE factor {factor}")
  return mask_BHW1.reshape(b, h // factor, factor, w // factor, factor, c).max(axis=(2, 4))


def vae_factor(cfg: VAEConfig) -> int:
  return 2 ** (len(cfg.block_out_channels) - 1)
