"""Content-adapter folders <-> `models.adapter.ContentAdapter`.

A folder is what diffusers' `ModelMixin.save_pretrained` writes for
`imprint_jax.torch_adapter.ContentAdapterTorch`: config.json (the architecture fields, with
`_class_name`) + diffusion_pytorch_model.safetensors (and optional variants such as
diffusion_pytorch_model.fp16.safetensors). The file's names and layout are PyTorch's
(`blocks.0.attn.q_proj.weight` is (out, in)), so `ContentAdapterTorch.from_pretrained` loads the
same folder. Folders of earlier releases (model.safetensors) still load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from imprint_jax.convert import common
from imprint_jax.convert.common import Rule
from imprint_jax.models.adapter import AdapterConfig, ContentAdapter, abstract_adapter

WHAT = "content adapter"
WEIGHTS_STEM = "diffusion_pytorch_model"
TORCH_CLASS = "ContentAdapterTorch"


def adapter_rules(cfg: AdapterConfig) -> list[Rule]:
  """The file-key <-> module-path table for an adapter with this config."""
  rules: list[Rule] = []
  if cfg.has_proj_in:
    rules += common.linear("proj_in", ("proj_in",))
  for i in range(cfg.depth):
    t, p = f"blocks.{i}", ("blocks", i)
    rules += common.norm(f"{t}.norm1", (*p, "norm1"))
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      rules += common.linear(f"{t}.attn.{name}", (*p, "attn", name))
    rules += common.norm(f"{t}.norm2", (*p, "norm2"))
    rules += common.linear(f"{t}.mlp.fc1", (*p, "mlp", "fc1"))
    rules += common.linear(f"{t}.mlp.fc2", (*p, "mlp", "fc2"))
  rules += common.norm("norm_out", ("norm_out",))
  rules += common.linear("proj_out", ("proj_out",))
  rules.append(Rule("null_context", ("null_context",)))
  return rules


def load_adapter(folder: str | os.PathLike, dtype: str = "float32",
                 remat: str = "none") -> ContentAdapter:
  """Builds a ContentAdapter from a folder written by `save_adapter` (compute dtype `dtype`)."""
  folder = Path(folder)
  legacy = not any(folder.glob(f"{WEIGHTS_STEM}*.safetensors*")) and (
      folder / "model.safetensors").is_file()
  files = common.find_weight_file(folder, "model" if legacy else WEIGHTS_STEM)
  config_path = folder / "config.json"
  cfg = AdapterConfig.from_json(common.read_json(config_path, WHAT), str(config_path),
                                dtype=dtype, remat=remat)
  tensors = common.read_safetensors(files)
  adapter = abstract_adapter(cfg)
  common.load_into(adapter, adapter_rules(cfg), tensors, source=str(folder), what=WHAT)
  return adapter


def save_adapter(adapter: ContentAdapter, out: str | os.PathLike) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors (float32), atomically."""
  from imprint_jax.convert.vae import DIFFUSERS_VERSION
  cfg = dataclasses.replace(adapter.cfg, dtype="float32", remat="none")
  tensors = common.export_from(adapter, adapter_rules(cfg), what=WHAT)
  config = dict(cfg.to_json(), _class_name=TORCH_CLASS, _diffusers_version=DIFFUSERS_VERSION)
  with common.AtomicDir(out) as tmp:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    common.write_safetensors(tmp / f"{WEIGHTS_STEM}.safetensors", tensors)
