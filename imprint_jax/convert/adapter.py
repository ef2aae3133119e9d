"""Content-adapter folders <-> `models.adapter.ContentAdapter`.

A folder is what diffusers' `ModelMixin.save_pretrained` writes for
`imprint_jax.torch_adapter.ContentAdapterTorch`: config.json (the architecture fields, with
`_class_name`) + diffusion_pytorch_model.safetensors (and optional variants such as
diffusion_pytorch_model.fp16.safetensors). The file's names and layout are PyTorch's
(`blocks.0.attn.q_proj.weight` is (out, in)), so `ContentAdapterTorch.from_pretrained` loads the
same folder. Folders of earlier releases (model.safetensors) still load. `config_to_json` /
`config_from_json` translate the folder's config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from imprint_jax.convert import common
from imprint_jax.convert.common import DIFFUSERS_VERSION, Rule
from imprint_jax.errors import UserError
from imprint_jax.models.adapter import AdapterConfig, ContentAdapter, abstract_adapter

WHAT = "content adapter"
WEIGHTS_STEM = "diffusion_pytorch_model"
TORCH_CLASS = "ContentAdapterTorch"
# Fields written to / read from config.json; dtype and remat are runtime choices.
FILE_FIELDS = ("in_dim", "width", "depth", "num_heads", "mlp_ratio", "out_dim", "layer_norm_eps")


def config_to_json(cfg: AdapterConfig) -> dict[str, Any]:
  """The config.json dict of an adapter folder: the architecture fields, under the class name
  of `imprint_jax.torch_adapter.ContentAdapterTorch` (diffusers' `from_pretrained` reads it)."""
  return {"_class_name": TORCH_CLASS, **{k: getattr(cfg, k) for k in FILE_FIELDS},
          "_diffusers_version": DIFFUSERS_VERSION}


def config_from_json(config: dict[str, Any], source: str = "config.json",
                     **overrides: Any) -> AdapterConfig:
  """Parses an adapter folder's config.json dict; `overrides` sets dtype/remat. Keys starting
  with '_' are diffusers' bookkeeping; any other unknown key is an error."""
  fields = {k: v for k, v in config.items() if not k.startswith("_")}
  unknown = sorted(set(fields) - set(FILE_FIELDS) - {"dtype", "remat"})
  if unknown:
    raise UserError(f"{source}: unknown adapter config key {unknown[0]!r} (expected"
                    f" {', '.join(FILE_FIELDS)})")
  if "in_dim" not in fields:
    raise UserError(f"{source}: missing 'in_dim'; not a content-adapter config")
  fields.pop("dtype", None)
  fields.pop("remat", None)
  try:
    return AdapterConfig(**fields, **overrides)
  except (TypeError, ValueError) as e:
    raise UserError(f"{source}: bad adapter config value ({e})") from None


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
  cfg = config_from_json(common.read_json(config_path, WHAT), str(config_path), dtype=dtype,
                         remat=remat)
  tensors = common.read_safetensors(files)
  adapter = abstract_adapter(cfg)
  common.load_into(adapter, adapter_rules(cfg), tensors, source=str(folder), what=WHAT)
  return adapter


def save_adapter(adapter: ContentAdapter, out: str | os.PathLike) -> None:
  """Writes config.json + diffusion_pytorch_model.safetensors (float32), atomically."""
  cfg = dataclasses.replace(adapter.cfg, dtype="float32", remat="none")
  tensors = common.export_from(adapter, adapter_rules(cfg), what=WHAT)
  config = config_to_json(cfg)
  with common.AtomicDir(out) as tmp:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    common.write_safetensors(tmp / f"{WEIGHTS_STEM}.safetensors", tensors)
