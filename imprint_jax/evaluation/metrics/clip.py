"""CLIP vision tower with its projection (transformers `CLIPVisionModelWithProjection`).

The CLIP-score of the paper (image to image) is 100 x the cosine between the image embeddings
(`image_embeds`: post-LayerNorm CLS token through `visual_projection`) of the generated object
and of the reference object. Default model: openai/clip-vit-large-patch14 (ViT-L/14, 224 px);
openai/clip-vit-base-patch32 works the same way. Both a full `CLIPModel` folder (what the hub
ships: text tower included, ignored here) and a `CLIPVisionModelWithProjection` folder load.

Preprocessing = `CLIPImageProcessor` with the PIL backend: shorter side to 224 (bicubic, on
uint8), centre crop 224, CLIP mean/std. (With torchvision installed transformers' default
backend resizes tensors instead; its results differ from PIL's by resampling noise.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.evaluation.metrics.vit import Preprocess, TransformerLayer, check_activation, patchify
from imprint_jax.models import layers

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """`CLIPVisionConfig` fields that inference needs; defaults = ViT-L/14 at 224 px."""
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  patch_size: int = 14
  image_size: int = 224
  num_channels: int = 3
  projection_dim: int = 768
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"
  dtype: str = "float32"

  def __post_init__(self):
    layers.compute_dtype(self.dtype)
    check_activation(self.hidden_act)
    if self.image_size % self.patch_size:
      raise UserError(f"CLIP image_size {self.image_size} is not a multiple of patch_size"
                      f" {self.patch_size}")

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], dtype: str = "float32") -> CLIPVisionConfig:
    """From a `CLIPModel` config.json (model_type 'clip', vision_config nested; the projection
    width is the top-level projection_dim) or a `clip_vision_model` one."""
    model_type = config.get("model_type")
    if model_type == "clip":
      vision = dict(config.get("vision_config") or {})
      projection_dim = config.get("projection_dim", 512)
    elif model_type == "clip_vision_model":
      vision = dict(config)
      projection_dim = config.get("projection_dim", 512)
    else:
      raise UserError(f"config.json model_type is {model_type!r}; the CLIP metric needs a"
                      " transformers CLIPModel or CLIPVisionModelWithProjection folder (e.g."
                      " openai/clip-vit-large-patch14)")
    try:
      return cls(hidden_size=int(vision["hidden_size"]),
                 num_layers=int(vision["num_hidden_layers"]),
                 num_heads=int(vision["num_attention_heads"]),
                 mlp_dim=int(vision["intermediate_size"]),
                 patch_size=int(vision.get("patch_size", 32)),
                 image_size=int(vision.get("image_size", 224)),
                 num_channels=int(vision.get("num_channels", 3)),
                 projection_dim=int(projection_dim),
                 layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
                 hidden_act=str(vision.get("hidden_act", "quick_gelu")), dtype=dtype)
    except KeyError as e:
      raise UserError(f"config.json lacks vision {e.args[0]!r}, which a CLIP vision config"
                      " needs") from None

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


def clip_preprocess(image_size: int = 224) -> Preprocess:
  """CLIPImageProcessor: shorter side to `image_size` (bicubic), centre crop, CLIP mean/std."""
  return Preprocess(resize=image_size, crop=image_size, mean=CLIP_MEAN, std=CLIP_STD)


class CLIPVision(nnx.Module):
  """(B, S, S, 3) preprocessed pixels -> (B, projection_dim) image embeddings."""

  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = layers.compute_dtype(cfg.dtype)
    d = cfg.hidden_size
    self.patch_embed = layers.conv(cfg.num_channels, d, cfg.patch_size, dtype=dt, rngs=rngs,
                                   stride=cfg.patch_size, padding="VALID", use_bias=False)
    init = nnx.initializers.normal(0.02)
    self.class_embedding = nnx.Param(init(rngs.params(), (d,), jnp.float32),
                                     **layers.axes("embed"))
    self.position_embedding = nnx.Param(
        init(rngs.params(), (cfg.num_patches + 1, d), jnp.float32), **layers.axes(None, "embed"))
    self.pre_layernorm = layers.layer_norm(d, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
    self.layers = nnx.List([
        TransformerLayer(d, cfg.num_heads, cfg.mlp_dim, eps=cfg.layer_norm_eps,
                         act=cfg.hidden_act, qkv_bias=True, dtype=dt, rngs=rngs)
        for _ in range(cfg.num_layers)])
    self.post_layernorm = layers.layer_norm(d, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
    self.visual_projection = layers.dense(d, cfg.projection_dim, ("embed", None), dtype=dt,
                                          rngs=rngs, use_bias=False)

  def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
    """`image_embeds` of CLIPVisionModelWithProjection, float32 (not normalised)."""
    cfg = self.cfg
    dt = layers.compute_dtype(cfg.dtype)
    x = patchify(self.patch_embed, pixels_BHWC.astype(dt), cfg.image_size, cfg.patch_size,
                 cfg.num_channels)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(dt), (x.shape[0], 1, cfg.hidden_size))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(dt)
    x = self.pre_layernorm(x)
    for layer in self.layers:
      x = layer(x)
    pooled = self.post_layernorm(x[:, 0])
    return self.visual_projection(pooled).astype(jnp.float32)
