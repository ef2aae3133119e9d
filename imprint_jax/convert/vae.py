"""diffusers AutoencoderKL folder <-> `imprint_jax.models.vae.AutoencoderKL`, both directions.

Two spellings of the mid-block attention exist in diffusers-format VAE files:

  new  `...attentions.0.{to_q,to_k,to_v,to_out.0}`  (what diffusers writes today)
  old  `...attentions.0.{query,key,value,proj_attn}` (the SD 1.x/2.x hub files, diffusers'
       deprecated `AttentionBlock`; diffusers renames them on load)

Both keep `group_norm`. Import detects the spelling from the keys; export always writes the new
one. The projections are linear (O, I) in diffusers files; a (O, I, 1, 1) 1x1-conv kernel (as in
the original LDM attention) is accepted as well, per key, through the `conv1x1_linear` kind.

`config_from_diffusers` / `config_to_diffusers` translate the folder's config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from flax import nnx

from imprint_jax.convert import common
from imprint_jax.convert.common import DIFFUSERS_VERSION, Rule
from imprint_jax.errors import UserError
from imprint_jax.models import layers
from imprint_jax.models.vae import DOWN_BLOCK, UP_BLOCK, AutoencoderKL, VAEConfig

WHAT = "VAE"
WEIGHTS_STEM = "diffusion_pytorch_model"
ATTN_NAMES = {
    "new": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
    "old": {"q": "query", "k": "key", "v": "value", "out": "proj_attn"},
}
_NNX_ATTN = {"q": ("to_q",), "k": ("to_k",), "v": ("to_v",), "out": ("to_out", 0)}


def config_from_diffusers(config: dict[str, Any], **overrides: Any) -> VAEConfig:
  """The VAEConfig of a diffusers `AutoencoderKL` config.json dict; `overrides` set our runtime
  fields (dtype, remat).

  Raises UserError for anything this implementation does not build (other block types,
  another activation, a latent shift), naming the key and the value.
  """
  name = config.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise UserError(f"VAE config: _class_name {name!r} is not supported (expected"
                    " 'AutoencoderKL')")
  boc = tuple(config.get("block_out_channels", (64,)))
  for key, want in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
    types = list(config.get(key, (want,)))
    for t in types:
      if t != want:
        raise UserError(f"VAE config {key}: block type {t!r} is not supported (only {want!r})")
    if len(types) != len(boc):
      raise UserError(f"VAE config {key} has {len(types)} entries but block_out_channels has"
                      f" {len(boc)}")
  act = config.get("act_fn", "silu")
  if act not in ("silu", "swish"):
    raise UserError(f"VAE config act_fn {act!r} is not supported (only 'silu')")
  sample_size = config.get("sample_size", 32)
  if isinstance(sample_size, (list, tuple)):
    sample_size = sample_size[0]
  fields = {f.name for f in dataclasses.fields(VAEConfig)}
  kw = {k: v for k, v in config.items()
        if k in fields and k not in ("sample_size", "block_out_channels")}
  # diffusers' own defaults where a config leaves a key out (they differ from the SD preset).
  kw.setdefault("layers_per_block", 1)
  kw.setdefault("latent_channels", 4)
  kw.setdefault("norm_num_groups", 32)
  kw.setdefault("scaling_factor", 0.18215)
  return VAEConfig(block_out_channels=boc, sample_size=int(sample_size), **{**kw, **overrides})


def config_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
  """The diffusers config.json dict that `AutoencoderKL.from_config` builds this VAE from."""
  n = len(cfg.block_out_channels)
  return {
      "_class_name": "AutoencoderKL",
      "in_channels": cfg.in_channels,
      "out_channels": cfg.out_channels,
      "down_block_types": [DOWN_BLOCK] * n,
      "up_block_types": [UP_BLOCK] * n,
      "block_out_channels": list(cfg.block_out_channels),
      "layers_per_block": cfg.layers_per_block,
      "act_fn": "silu",
      "latent_channels": cfg.latent_channels,
      "norm_num_groups": cfg.norm_num_groups,
      "sample_size": cfg.sample_size,
      "scaling_factor": cfg.scaling_factor,
      "shift_factor": None,
      "latents_mean": None,
      "latents_std": None,
      "force_upcast": True,
      "use_quant_conv": cfg.use_quant_conv,
      "use_post_quant_conv": cfg.use_post_quant_conv,
      "mid_block_add_attention": cfg.mid_block_add_attention,
  }



def _resnet(prefix: str, path: tuple, in_ch: int, out_ch: int) -> list[Rule]:
  rules = (common.norm(f"{prefix}.norm1", (*path, "norm1"))
           + common.conv(f"{prefix}.conv1", (*path, "conv1"))
           + common.norm(f"{prefix}.norm2", (*path, "norm2"))
           + common.conv(f"{prefix}.conv2", (*path, "conv2")))
  if in_ch != out_ch:
    rules += common.conv(f"{prefix}.conv_shortcut", (*path, "conv_shortcut"))
  return rules


def _attention(prefix: str, path: tuple, style: str) -> list[Rule]:
  rules = common.norm(f"{prefix}.group_norm", (*path, "group_norm"))
  for role, torch_name in ATTN_NAMES[style].items():
    rules += common.linear(f"{prefix}.{torch_name}", (*path, *_NNX_ATTN[role]))
  return rules


def _mid(prefix: str, path: tuple, ch: int, cfg: VAEConfig, style: str) -> list[Rule]:
  rules = []
  for i in range(2):
    rules += _resnet(f"{prefix}.resnets.{i}", (*path, "resnets", i), ch, ch)
  if cfg.mid_block_add_attention:
    rules += _attention(f"{prefix}.attentions.0", (*path, "attentions", 0), style)
  return rules


def vae_rules(cfg: VAEConfig, style: str = "new") -> list[Rule]:
  """The name table of a VAE with this config; `style` is the attention spelling."""
  if style not in ATTN_NAMES:
    raise ValueError(f"unknown attention spelling {style!r}")
  boc, n = cfg.block_out_channels, len(cfg.block_out_channels)
  rules = common.conv("encoder.conv_in", ("encoder", "conv_in"))
  for i in range(n):
    p, path = f"encoder.down_blocks.{i}", ("encoder", "down_blocks", i)
    for j in range(cfg.layers_per_block):
      in_ch = boc[max(i - 1, 0)] if j == 0 else boc[i]
      rules += _resnet(f"{p}.resnets.{j}", (*path, "resnets", j), in_ch, boc[i])
    if i < n - 1:
      rules += common.conv(f"{p}.downsamplers.0.conv", (*path, "downsamplers", 0, "conv"))
  rules += _mid("encoder.mid_block", ("encoder", "mid_block"), boc[-1], cfg, style)
  rules += common.norm("encoder.conv_norm_out", ("encoder", "conv_norm_out"))
  rules += common.conv("encoder.conv_out", ("encoder", "conv_out"))

  rules += common.conv("decoder.conv_in", ("decoder", "conv_in"))
  rules += _mid("decoder.mid_block", ("decoder", "mid_block"), boc[-1], cfg, style)
  rev = boc[::-1]
  for i in range(n):
    p, path = f"decoder.up_blocks.{i}", ("decoder", "up_blocks", i)
    for j in range(cfg.layers_per_block + 1):
      in_ch = rev[max(i - 1, 0)] if j == 0 else rev[i]
      rules += _resnet(f"{p}.resnets.{j}", (*path, "resnets", j), in_ch, rev[i])
    if i < n - 1:
      rules += common.conv(f"{p}.upsamplers.0.conv", (*path, "upsamplers", 0, "conv"))
  rules += common.norm("decoder.conv_norm_out", ("decoder", "conv_norm_out"))
  rules += common.conv("decoder.conv_out", ("decoder", "conv_out"))

  if cfg.use_quant_conv:
    rules += common.conv("quant_conv", ("quant_conv",))
  if cfg.use_post_quant_conv:
    rules += common.conv("post_quant_conv", ("post_quant_conv",))
  return rules


def detect_style(keys: Any, source: str = "VAE weights") -> str:
  """'old' or 'new': which attention spelling a VAE file's keys use (UserError if both)."""
  def has(names: dict[str, str]) -> bool:
    return any(f".attentions.0.{names['q']}." in k for k in keys)
  old, new = has(ATTN_NAMES["old"]), has(ATTN_NAMES["new"])
  if old and new:
    raise UserError(f"{source}: mixes the old (query/key/value/proj_attn) and new (to_q/to_k/"
                    "to_v/to_out.0) attention spellings; re-save it with diffusers")
  return "old" if old else "new"


def vae_folder(folder: str | os.PathLike) -> Path:
  """A diffusers VAE folder, or a pipeline folder (with model_index.json) -> its `vae/`."""
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"{folder}: no such folder")
  if (folder / "model_index.json").is_file():
    sub = folder / "vae"
    if not sub.is_dir():
      raise UserError(f"{folder} is a diffusers pipeline folder without a vae/ subfolder")
    return sub
  return folder


def load_vae(folder: str | os.PathLike, *, dtype: str = "float32",
             remat: str = "none") -> AutoencoderKL:
  """Builds an `AutoencoderKL` from a diffusers folder (VAE folder or pipeline folder).

  `dtype` is the compute dtype; parameters are float32. Either attention spelling is read.
  Raises UserError for a missing config/weights, pickle-only weights, an unsupported
  architecture, or a missing/unexpected/wrongly-shaped key (naming it).
  """
  folder = vae_folder(folder)
  cfg = config_from_diffusers(common.read_json(folder / "config.json", WHAT), dtype=dtype,
                              remat=remat)
  files = common.find_weight_file(folder, WEIGHTS_STEM)
  tensors = common.read_safetensors(files)
  source = str(files[0]) if len(files) == 1 else str(folder)
  rules = vae_rules(cfg, detect_style(tensors, source))
  # Attention projections stored as 1x1 conv kernels (O, I, 1, 1) map to the same dense layer.
  rules = [Rule(r.torch, r.path, "conv1x1_linear")
           if r.kind == "linear" and getattr(tensors.get(r.torch), "ndim", 2) == 4 else r
           for r in rules]
  # Shapes only: every parameter is overwritten, so random initialisation would be wasted work.
  vae = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=layers.init_rngs(0)))
  common.load_into(vae, rules, tensors, source=source, what=WHAT)
  return vae


def save_vae(vae: AutoencoderKL, out: str | os.PathLike) -> Path:
  """Writes a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors, new
  attention spelling, float32) that `diffusers.AutoencoderKL.from_pretrained` loads as is."""
  tensors = common.export_from(vae, vae_rules(vae.cfg, "new"), what=WHAT)
  config = {**config_to_diffusers(vae.cfg), "_diffusers_version": DIFFUSERS_VERSION}
  with common.AtomicDir(out) as tmp:
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    common.write_safetensors(tmp / f"{WEIGHTS_STEM}.safetensors", tensors)
  return Path(out)
