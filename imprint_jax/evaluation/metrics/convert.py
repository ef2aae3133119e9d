"""Explicit name tables: PyTorch metric checkpoints (safetensors) -> the JAX metric networks.

  CLIP       transformers CLIPModel / CLIPVisionModelWithProjection folder (model.safetensors):
             `vision_model.*` + `visual_projection.weight`; the text tower, `text_projection`,
             `logit_scale` and `position_ids` buffers are ignored by name.
  DINO ViT   transformers ViTModel folder: `embeddings.*`, `encoder.layer.N.*`, `layernorm.*`;
             the (unused) `pooler.*` is ignored by name.
  Inception  pytorch-fid's FID weights converted once to safetensors (the release file
             `pt_inception-2015-12-05-6726825d.pth` is a pickle, which we never load) with
             the one-line command `fid.CONVERT_INCEPTION`, which the missing-weights message
             and `imprint-jax evaluate --help` print.
             Keys are torchvision's Inception3 names (`Conv2d_1a_3x3.conv.weight`,
             `Mixed_5b.branch1x1.bn.running_mean`, ...); `fc.*` (the 1008-way classifier) and
             `*.num_batches_tracked` are ignored by name.

Every other key must be named by a table: an unknown or missing key is a UserError naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from imprint_jax.convert import common
from imprint_jax.convert.common import Rule
from imprint_jax.errors import UserError
from imprint_jax.evaluation.metrics.clip import CLIPVision, CLIPVisionConfig
from imprint_jax.evaluation.metrics.fid import CONVERT_INCEPTION, inception_missing_message
from imprint_jax.evaluation.metrics.inception import DIVISORS, FIDInceptionV3, InceptionConfig
from imprint_jax.evaluation.metrics.vit import ViT, ViTConfig
from imprint_jax.models import layers


def _drop(tensors: Mapping[str, np.ndarray], ignored: re.Pattern) -> dict[str, np.ndarray]:
  return {k: v for k, v in tensors.items() if not ignored.fullmatch(k)}


def _layer_rules(t: str, p: tuple, names: Mapping[str, str]) -> list[Rule]:
  """A pre-LN transformer layer (metrics.vit.TransformerLayer); `names` maps our sub-module
  names (q, k, v, o, norm1, norm2, fc1, fc2) to the checkpoint's."""
  rules = []
  for ours in ("q", "k", "v", "o"):
    rules += common.linear(f"{t}.{names[ours]}", (*p, "attn", ours))
  for ours in ("fc1", "fc2"):
    rules += common.linear(f"{t}.{names[ours]}", (*p, ours))
  for ours in ("norm1", "norm2"):
    rules += common.norm(f"{t}.{names[ours]}", (*p, ours))
  return rules


# ------------------------------------------------------------------------------------ CLIP

CLIP_WHAT = "CLIP vision model"
_CLIP_IGNORED = re.compile(r"text_model\..*|text_projection\..*|logit_scale|.*\.position_ids")
_CLIP_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def clip_rules(cfg: CLIPVisionConfig) -> list[Rule]:
  v = "vision_model"
  rules = [
      *common.conv(f"{v}.embeddings.patch_embedding", ("patch_embed",), bias=False),
      Rule(f"{v}.embeddings.class_embedding", ("class_embedding",)),
      Rule(f"{v}.embeddings.position_embedding.weight", ("position_embedding",)),
      *common.norm(f"{v}.pre_layrnorm", ("pre_layernorm",)),
      *common.norm(f"{v}.post_layernorm", ("post_layernorm",)),
      *common.linear("visual_projection", ("visual_projection",), bias=False),
  ]
  for i in range(cfg.num_layers):
    rules += _layer_rules(f"{v}.encoder.layers.{i}", ("layers", i), _CLIP_LAYER)
  return rules


def load_clip(folder: str | os.PathLike, dtype: str = "float32") -> CLIPVision:
  """CLIPVision from a transformers CLIPModel or CLIPVisionModelWithProjection folder."""
  folder = Path(folder)
  files = common.find_weight_file(folder, "model")
  cfg = CLIPVisionConfig.from_hf(common.read_json(folder / "config.json", CLIP_WHAT), dtype)
  tensors = _drop(common.read_safetensors(files), _CLIP_IGNORED)
  model = nnx.eval_shape(lambda: CLIPVision(cfg, rngs=layers.init_rngs(0)))
  common.load_into(model, clip_rules(cfg), tensors, source=str(folder), what=CLIP_WHAT)
  return model


# ------------------------------------------------------------------------------------ DINO

VIT_WHAT = "ViT (DINO)"
_VIT_IGNORED = re.compile(r"pooler\..*|embeddings\.mask_token")
_VIT_LAYER = {"q": "attention.attention.query", "k": "attention.attention.key",
              "v": "attention.attention.value", "o": "attention.output.dense",
              "norm1": "layernorm_before", "norm2": "layernorm_after",
              "fc1": "intermediate.dense", "fc2": "output.dense"}


def vit_rules(cfg: ViTConfig) -> list[Rule]:
  rules = [
      *common.conv("embeddings.patch_embeddings.projection", ("patch_embed",)),
      Rule("embeddings.cls_token", ("cls_token",)),
      Rule("embeddings.position_embeddings", ("position_embeddings",)),
      *common.norm("layernorm", ("layernorm",)),
  ]
  for i in range(cfg.num_layers):
    rules += _layer_rules(f"encoder.layer.{i}", ("layers", i), _VIT_LAYER)
  return rules


def load_vit(folder: str | os.PathLike, dtype: str = "float32") -> ViT:
  """ViT from a transformers ViTModel folder (e.g. facebook/dino-vits16)."""
  folder = Path(folder)
  files = common.find_weight_file(folder, "model")
  cfg = ViTConfig.from_hf(common.read_json(folder / "config.json", VIT_WHAT), dtype)
  tensors = _drop(common.read_safetensors(files), _VIT_IGNORED)
  model = nnx.eval_shape(lambda: ViT(cfg, rngs=layers.init_rngs(0)))
  common.load_into(model, vit_rules(cfg), tensors, source=str(folder), what=VIT_WHAT)
  return model


# ------------------------------------------------------------------------------- Inception

INCEPTION_WHAT = "FID Inception"
_INCEPTION_IGNORED = re.compile(r"fc\.(weight|bias)|.*\.num_batches_tracked")
STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
BRANCHES = {
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}
MIXED = (("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
         ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
         ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E"))


def _basic_conv_rules(t: str, p: tuple) -> list[Rule]:
  return [*common.conv(f"{t}.conv", (*p, "conv"), bias=False),
          Rule(f"{t}.bn.weight", (*p, "bn", "scale")),
          Rule(f"{t}.bn.bias", (*p, "bn", "bias")),
          Rule(f"{t}.bn.running_mean", (*p, "bn", "mean")),
          Rule(f"{t}.bn.running_var", (*p, "bn", "var"))]


def inception_rules() -> list[Rule]:
  """The same table for every width: names do not depend on the channel counts."""
  rules = []
  for name in STEM:
    rules += _basic_conv_rules(name, (name,))
  for block, kind in MIXED:
    for branch in BRANCHES[kind]:
      rules += _basic_conv_rules(f"{block}.{branch}", (block, branch))
  return rules


def load_inception(path: str | os.PathLike, dtype: str = "float32") -> FIDInceptionV3:
  """FIDInceptionV3 from pytorch-fid's weights converted to a `.safetensors` file.

  The width (1 = the real network) is read from the first conv, so tiny test copies load
  through the same path.
  """
  path = Path(path)
  if path.suffix in (".pth", ".pt", ".bin", ".pkl"):
    raise UserError(f"{path}: a pickle file; imprint-jax reads safetensors only. Convert it"
                    f" once with `{CONVERT_INCEPTION}` and pass the .safetensors file")
  if not path.is_file():
    raise UserError(inception_missing_message(path))
  tensors = _drop(common.read_safetensors([path]), _INCEPTION_IGNORED)
  first = tensors.get("Conv2d_1a_3x3.conv.weight")
  if first is None or first.ndim != 4 or not first.shape[0] or 32 % first.shape[0] or (
      32 // first.shape[0]) not in DIVISORS:
    raise UserError(f"{path}: not pytorch-fid Inception weights (Conv2d_1a_3x3.conv.weight"
                    f" missing or of shape {None if first is None else first.shape})")
  cfg = InceptionConfig(width_divisor=32 // first.shape[0], dtype=dtype)
  model = nnx.eval_shape(lambda: FIDInceptionV3(cfg, rngs=layers.init_rngs(0)))
  common.load_into(model, inception_rules(), tensors, source=str(path), what=INCEPTION_WHAT)
  return model
