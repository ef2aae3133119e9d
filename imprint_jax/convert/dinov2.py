"""transformers DINOv2 folders (config.json + model.safetensors) <-> `models.dinov2.Dinov2`.

Names are those of the safetensors FILE (what the hub ships and what `save_pretrained`
writes), e.g. `encoder.layer.0.attention.attention.query.weight` and, for SwiGLU, the fused
`mlp.weights_in`; transformers 5 renames them in memory (`q_proj`, `gate_proj`/`up_proj`), which
is why we never go through `state_dict()`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from imprint_jax.convert import common
from imprint_jax.convert.common import Rule
from imprint_jax.models.dinov2 import Dinov2, Dinov2Config, abstract_dinov2

WHAT = "DINOv2"


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
  cfg = Dinov2Config.from_hf(common.read_json(folder / "config.json", WHAT), dtype=dtype,
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
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2, sort_keys=True) + "\n")
    common.write_safetensors(tmp / "model.safetensors", tensors)
