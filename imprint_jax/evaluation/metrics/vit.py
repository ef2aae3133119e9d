"""DINO ViT (transformers `ViTModel`) for the DINO-score, and the pieces CLIP shares with it.

The DINO-score embeds an image with DINO ViT-S/16 (`facebook/dino-vits16`) and takes the CLS
token after the final LayerNorm (`last_hidden_state[:, 0]`), not the pooler (a randomly
initialised tanh layer in that checkpoint, never trained by DINO).

Preprocessing is DINO's evaluation transform (Resize(256) on the shorter side, bicubic;
CenterCrop(224); ImageNet mean/std), as in the DINO paper's linear/k-NN evaluation and the
DreamBooth DINO-score. The hub folder's `preprocessor_config.json` (a ViTFeatureExtractor:
224 x 224 bilinear, mean = std = 0.5) is deliberately not used: DINO was trained on
ImageNet-normalised inputs, so 0.5/0.5 shifts its features.

Resizes run in PIL on uint8 images, like the transformers PIL processors and torchvision's
transforms on PIL images; the networks take NHWC float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from imprint_jax.errors import UserError
from imprint_jax.models import attention, layers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _quick_gelu(x: jax.Array) -> jax.Array:  # OpenAI CLIP's activation
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": _quick_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def check_activation(name: str) -> str:
  if name not in ACTIVATIONS:
    raise UserError(f"config.json hidden_act {name!r} is not supported (expected one of"
                    f" {sorted(ACTIVATIONS)})")
  return name


# ----------------------------------------------------------------------------- preprocessing

@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Resize the shorter side to `resize` (PIL, on uint8), centre-crop `crop`, normalise.

  The long side becomes int(resize * long / short) and the crop starts at
  ((h - crop) // 2, (w - crop) // 2), as in transformers' image processors.
  """
  resize: int
  crop: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resample: int = Image.Resampling.BICUBIC

  def one(self, image_HW3: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (crop, crop, 3) float32, normalised."""
    image = np.asarray(image_HW3)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise UserError(f"metric input must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(self.resize * long / short)
    new_h, new_w = (self.resize, new_long) if h <= w else (new_long, self.resize)
    if (new_h, new_w) != (h, w):
      image = np.asarray(Image.fromarray(image).resize((new_w, new_h), self.resample))
    if new_h < self.crop or new_w < self.crop:
      raise UserError(f"resize {self.resize} is smaller than crop {self.crop}")
    top, left = (new_h - self.crop) // 2, (new_w - self.crop) // 2
    image = image[top:top + self.crop, left:left + self.crop].astype(np.float32) / 255.0
    return (image - np.float32(self.mean)) / np.float32(self.std)

  def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """A list of (H, W, 3) uint8 images (sizes may differ) -> (B, crop, crop, 3) float32."""
    return np.stack([self.one(im) for im in images]).astype(np.float32)


def dino_preprocess(image_size: int = 224) -> Preprocess:
  """DINO's evaluation transform scaled to `image_size` (256 -> 224 at the real size)."""
  return Preprocess(resize=image_size * 8 // 7, crop=image_size, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD)


# ----------------------------------------------------------------------------- shared blocks

class SelfAttention(nnx.Module):
  """Multi-head self-attention with separate q/k/v projections and an output projection."""

  def __init__(self, width: int, heads: int, *, qkv_bias: bool, dtype: Any, rngs: nnx.Rngs):
    if width % heads:
      raise UserError(f"hidden_size {width} is not divisible by num_attention_heads {heads}")
    self.heads = heads
    self.q = layers.dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs,
                          use_bias=qkv_bias)
    self.k = layers.dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs,
                          use_bias=qkv_bias)
    self.v = layers.dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs,
                          use_bias=qkv_bias)
    self.o = layers.dense(width, width, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    b, l, d = x_BLD.shape
    split = lambda t: t.reshape(b, l, self.heads, d // self.heads)
    o_BLHK = attention.attention(split(self.q(x_BLD)), split(self.k(x_BLD)), split(self.v(x_BLD)))
    return self.o(o_BLHK.reshape(b, l, d))


class TransformerLayer(nnx.Module):
  """Pre-LN encoder layer: x + attn(norm1(x)), then x + fc2(act(fc1(norm2(x))))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, eps: float, act: str,
               qkv_bias: bool, dtype: Any, rngs: nnx.Rngs):
    self.act = check_activation(act)
    self.norm1 = layers.layer_norm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.attn = SelfAttention(width, heads, qkv_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.norm2 = layers.layer_norm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.fc1 = layers.dense(width, mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = layers.dense(mlp_dim, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x_BLD = x_BLD + self.attn(self.norm1(x_BLD))
    return x_BLD + self.fc2(ACTIVATIONS[self.act](self.fc1(self.norm2(x_BLD))))


def patchify(conv: nnx.Conv, pixels_BHWC: jax.Array, image_size: int, patch: int,
             channels: int) -> jax.Array:
  """Patch embedding at the native size only: (B, S, S, C) -> (B, (S/p)^2, D)."""
  b, h, w, c = pixels_BHWC.shape
  if (h, w, c) != (image_size, image_size, channels):
    raise UserError(f"input has shape {pixels_BHWC.shape}; this network takes (B, {image_size},"
                    f" {image_size}, {channels}) (run its Preprocess first)")
  x = conv(pixels_BHWC)
  return x.reshape(b, -1, x.shape[-1])


# ----------------------------------------------------------------------------- DINO ViT

@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """transformers `ViTConfig` fields that inference needs; defaults = facebook/dino-vits16."""
  hidden_size: int = 384
  num_layers: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  patch_size: int = 16
  image_size: int = 224
  num_channels: int = 3
  layer_norm_eps: float = 1e-12  # the hub config's value (DINO itself used 1e-6)
  qkv_bias: bool = True
  hidden_act: str = "gelu"
  dtype: str = "float32"

  def __post_init__(self):
    layers.compute_dtype(self.dtype)
    check_activation(self.hidden_act)
    if self.image_size % self.patch_size:
      raise UserError(f"ViT image_size {self.image_size} is not a multiple of patch_size"
                      f" {self.patch_size}")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], dtype: str = "float32") -> ViTConfig:
    if config.get("model_type") != "vit":
      raise UserError(f"config.json model_type is {config.get('model_type')!r}; the DINO"
                      " metric needs a transformers ViTModel folder (model_type 'vit', e.g."
                      " facebook/dino-vits16)")
    try:
      return cls(hidden_size=int(config["hidden_size"]),
                 num_layers=int(config["num_hidden_layers"]),
                 num_heads=int(config["num_attention_heads"]),
                 mlp_dim=int(config["intermediate_size"]),
                 patch_size=int(config.get("patch_size", 16)),
                 image_size=int(config.get("image_size", 224)),
                 num_channels=int(config.get("num_channels", 3)),
                 layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                 qkv_bias=bool(config.get("qkv_bias", True)),
                 hidden_act=str(config.get("hidden_act", "gelu")), dtype=dtype)
    except KeyError as e:
      raise UserError(f"config.json lacks {e.args[0]!r}, which a ViT config needs") from None

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


class ViT(nnx.Module):
  """transformers ViTModel without its pooler: (B, S, S, 3) -> CLS after the final LayerNorm."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = layers.compute_dtype(cfg.dtype)
    d = cfg.hidden_size
    self.patch_embed = layers.conv(cfg.num_channels, d, cfg.patch_size, dtype=dt, rngs=rngs,
                                   stride=cfg.patch_size, padding="VALID")
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d), jnp.float32),
                               **layers.axes(None, None, "embed"))
    self.position_embeddings = nnx.Param(
        init(rngs.params(), (1, cfg.num_patches + 1, d), jnp.float32),
        **layers.axes(None, None, "embed"))
    self.layers = nnx.List([
        TransformerLayer(d, cfg.num_heads, cfg.mlp_dim, eps=cfg.layer_norm_eps,
                         act=cfg.hidden_act, qkv_bias=cfg.qkv_bias, dtype=dt, rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.layernorm = layers.layer_norm(d, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)

  def tokens(self, pixels_BHWC: jax.Array) -> jax.Array:
    """`last_hidden_state`: (B, 1 + N, D), the final LayerNorm applied to every token."""
    cfg = self.cfg
    dt = layers.compute_dtype(cfg.dtype)
    x = patchify(self.patch_embed, pixels_BHWC.astype(dt), cfg.image_size, cfg.patch_size,
                 cfg.num_channels)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (x.shape[0], 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embeddings[...].astype(dt)
    for layer in self.layers:
      x = layer(x)
    return self.layernorm(x)

  def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
    """(B, S, S, 3) preprocessed pixels -> (B, D) float32 CLS embedding (the DINO feature)."""
    return self.tokens(pixels_BHWC)[:, 0].astype(jnp.float32)
