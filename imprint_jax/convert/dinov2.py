"""transformers DINOv2 folders (config.json + model.safetensors) <-> `models.dinov2.Dinov2`.

Names are those of the safetensors FILE (what the hub ships and what `save_pretrained`
writes), e.g. `encoder.layer.0.attention.attention.query.weight` and, for SwiGLU, the fused
`mlp.weights_in`; transformers 5 renames them in memory (`q_proj`, `gate_proj`/`up_proj`), which
is why we never go through `state_dict()`. `config_from_transformers` /
`config_to_transformers` translate the folder's config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imprint_jax.convert import common
from imprint_jax.convert.common import Rule
from imprint_jax.errors import UserError
from imprint_jax.models.dinov2 import Dinov2, Dinov2Config, abstract_dinov2

WHAT = "DINOv2"


def config_from_transformers(config: Mapping[str, Any], **overrides: Any) -> Dinov2Config:
  """The Dinov2Config of a transformers `config.json` dict (model_type dinov2 or
  dinov2_with_registers).

  Training-only settings (dropout, drop_path) are ignored; settings this module cannot
  reproduce raise UserError. `overrides` sets our runtime fields (dtype, remat).
  """
  model_type = config.get("model_type")
  if model_type not in ("dinov2", "dinov2_with_registers"):
    raise UserError(f"config.json model_type is {model_type!r}, expected 'dinov2' or"
                    " 'dinov2_with_registers'")
  act = config.get("hidden_act", "gelu")
  if act != "gelu":
    raise UserError(f"config.json hidden_act {act!r} is not supported (only 'gelu', the"
                    " exact erf GELU of the released DINOv2 models)")
  if "head_dim" in config and config["head_dim"] * config["num_attention_heads"] != (
      config["hidden_size"]):
    raise UserError("config.json head_dim * num_attention_heads must equal hidden_size")
  image_size = _square(config.get("image_size", 224), "image_size")
  patch_size = _square(config.get("patch_size", 14), "patch_size")
  if model_type == "dinov2_with_registers":
    registers = int(config.get("num_register_tokens", 4))
    if registers == 0:
      raise UserError("config.json: a dinov2_with_registers model with 0 register tokens is"
                      " not supported (its position interpolation differs from dinov2's)")
    use_mask_token = True
  else:
    registers = 0
    use_mask_token = bool(config.get("use_mask_token", True))
  try:
    return Dinov2Config(hidden_size=int(config["hidden_size"]),
                        num_layers=int(config["num_hidden_layers"]),
                        num_heads=int(config["num_attention_heads"]),
                        mlp_ratio=float(config.get("mlp_ratio", 4)),
                        patch_size=patch_size, image_size=image_size,
                        num_channels=int(config.get("num_channels", 3)),
                        num_register_tokens=registers,
                        use_swiglu_ffn=bool(config.get("use_swiglu_ffn", False)),
                        layerscale_value=float(config.get("layerscale_value", 1.0)),
                        layer_norm_eps=float(config.get("layer_norm_eps", 1e-6)),
                        qkv_bias=bool(config.get("qkv_bias", True)),
                        use_mask_token=use_mask_token, **overrides)
  except KeyError as e:
    raise UserError(f"config.json lacks {e.args[0]!r}, which a DINOv2 config needs") from None


def config_to_transformers(cfg: Dinov2Config) -> dict[str, Any]:
  """A complete transformers config.json dict (Dinov2Model, or Dinov2WithRegistersModel)."""
  registers = cfg.num_register_tokens > 0
  mlp_ratio = int(cfg.mlp_ratio) if float(cfg.mlp_ratio).is_integer() else cfg.mlp_ratio
  out = {
      "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
      "model_type": "dinov2_with_registers" if registers else "dinov2",
      "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "mlp_ratio": mlp_ratio,
      "hidden_act": "gelu",
      "hidden_dropout_prob": 0.0,
      "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02,
      "layer_norm_eps": cfg.layer_norm_eps,
      "image_size": cfg.image_size,
      "patch_size": cfg.patch_size,
      "num_channels": cfg.num_channels,
      "qkv_bias": cfg.qkv_bias,
      "layerscale_value": cfg.layerscale_value,
      "drop_path_rate": 0.0,
      "use_swiglu_ffn": cfg.use_swiglu_ffn,
      "apply_layernorm": True,
      "reshape_hidden_states": True,
      "dtype": "float32",
  }
  if registers:
    out["num_register_tokens"] = cfg.num_register_tokens
  else:
    out["use_mask_token"] = cfg.use_mask_token
  return out


def _square(value: Any, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise UserError(f"config.json {name} {value} is not square; DINOv2 needs a square"
                      f" {name}")
    value = value[0]
  return int(value)


def dinov2_rules(cfg: Dinov2Config) -> list[Rule]:
  """The file-key <-> module-path table for a DINOv2 with this config."""
  rules = [
      *common.conv("embeddings.patch_embeddings.projection", ("patch_embed",)),
      Rule("embeddings.cls_token", ("cls_token",)),
      Rule("embeddings.position_embeddings", ("position_embeddings",)),
  ]
  if cfg.use_mask_token:
    rules.append(Rule("embeddings.mask_token", ("mask_token",)))
  if cfg.num_register_tokens:
    rules.append(Rule("embeddings.register_tokens", ("register_tokens",)))
  for i in range(cfg.num_layers):
    t, p = f"encoder.layer.{i}", ("layers", i)
    for name in ("query", "key", "value"):
      rules += common.linear(f"{t}.attention.attention.{name}", (*p, "attention", name),
                             bias=cfg.qkv_bias)
    rules += common.linear(f"{t}.attention.output.dense", (*p, "attention", "out"))
    rules += common.norm(f"{t}.norm1", (*p, "norm1"))
    rules += common.norm(f"{t}.norm2", (*p, "norm2"))
    rules.append(Rule(f"{t}.layer_scale1.lambda1", (*p, "layer_scale1")))
    rules.append(Rule(f"{t}.layer_scale2.lambda1", (*p, "layer_scale2")))
    mlp = ("weights_in", "weights_out") if cfg.use_swiglu_ffn else ("fc1", "fc2")
    for name in mlp:
      rules += common.linear(f"{t}.mlp.{name}", (*p, "mlp", name))
  rules += common.norm("layernorm", ("layernorm",))
  return rules


def load_dinov2(folder: str | os.PathLike, dtype: str = "float32",
                remat: str = "none") -> Dinov2:
  """Builds a Dinov2 from a transformers folder (Dinov2Model or Dinov2WithRegistersModel).

  The module is created abstractly (no random init), so peak memory is the file's tensors
  plus the parameters once. `dtype` is the compute dtype; parameters stay float32.
  """
  folder = Path(folder)
  files = common.find_weight_file(folder, "model")
  cfg = config_from_transformers(common.read_json(folder / "config.json", WHAT), dtype=dtype,
                                 remat=remat)
  tensors = common.read_safetensors(files)
  model = abstract_dinov2(cfg)
  common.load_into(model, dinov2_rules(cfg), tensors, source=str(folder), what=WHAT)
  return model


def save_dinov2(model: Dinov2, out_folder: str | os.PathLike) -> None:
  """Writes a folder that `Dinov2Model` / `Dinov2WithRegistersModel.from_pretrained` loads.

  Weights are float32, under the hub's names; the folder is written atomically.
  """
  cfg = dataclasses.replace(model.cfg, dtype="float32", remat="none")
  tensors = common.export_from(model, dinov2_rules(cfg), what=WHAT)
  with common.AtomicDir(out_folder) as tmp:
    (tmp / "config.json").write_text(
        json.dumps(config_to_transformers(cfg), indent=2, sort_keys=True) + "\n")
    common.write_safetensors(tmp / "model.safetensors", tensors)
