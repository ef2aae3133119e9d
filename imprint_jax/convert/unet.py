"""diffusers `UNet2DConditionModel` folders <-> `models.unet.UNet2DCondition`, both ways.

One name table (`unet_rules`) built from the config serves import and export. Besides the
renames in `models/unet.py`'s docstring, 1x1 convolutions (resnet shortcuts; the transformers'
`proj_in`/`proj_out` unless `use_linear_projection`) become dense kernels: kind
'conv1x1_linear'.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


from imprint_jax.convert import common
from imprint_jax.convert.common import Rule, join
from imprint_jax.errors import UserError
from imprint_jax.models.unet import UNet2DCondition, UNetConfig, abstract_unet

WHAT = "UNet2DConditionModel"
WEIGHTS_STEM = "diffusion_pytorch_model"


def _dense1x1(torch_prefix: str, path: tuple, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{torch_prefix}.weight", (*path, "kernel"), "conv1x1_linear")]
  if bias:
    rules.append(Rule(f"{torch_prefix}.bias", (*path, "bias")))
  return rules


def resnet_rules(prefix: str, path: tuple, shortcut: bool) -> list[Rule]:
  """One ResnetBlock2D; `shortcut` when its input and output widths differ."""
  rules = [
      *common.norm(join(prefix, "norm1"), (*path, "norm1")),
      *common.conv(join(prefix, "conv1"), (*path, "conv1")),
      *common.linear(join(prefix, "time_emb_proj"), (*path, "time_emb_proj")),
      *common.norm(join(prefix, "norm2"), (*path, "norm2")),
      *common.conv(join(prefix, "conv2"), (*path, "conv2")),
  ]
  if shortcut:
    rules += _dense1x1(join(prefix, "conv_shortcut"), (*path, "conv_shortcut"))
  return rules


def _attention(prefix: str, path: tuple) -> list[Rule]:
  rules = []
  for name in ("to_q", "to_k", "to_v"):
    rules += common.linear(join(prefix, name), (*path, name), bias=False)
  return rules + common.linear(join(prefix, "to_out.0"), (*path, "to_out"))


def transformer_rules(prefix: str, path: tuple, depth: int, linear_proj: bool) -> list[Rule]:
  """One Transformer2DModel with `depth` BasicTransformerBlocks."""
  proj = common.linear if linear_proj else _dense1x1
  rules = [*common.norm(join(prefix, "norm"), (*path, "norm")),
           *proj(join(prefix, "proj_in"), (*path, "proj_in"))]
  for k in range(depth):
    p, q = join(prefix, "transformer_blocks", k), (*path, "transformer_blocks", k)
    for name in ("norm1", "norm2", "norm3"):
      rules += common.norm(join(p, name), (*q, name))
    rules += _attention(join(p, "attn1"), (*q, "attn1"))
    rules += _attention(join(p, "attn2"), (*q, "attn2"))
    rules += common.linear(join(p, "ff.net.0.proj"), (*q, "ff", "proj"))
    rules += common.linear(join(p, "ff.net.2"), (*q, "ff", "out"))
  return rules + proj(join(prefix, "proj_out"), (*path, "proj_out"))


def unet_rules(cfg: UNetConfig) -> list[Rule]:
  """Every tensor of a diffusers UNet with this config: safetensors key <-> nnx path."""
  rules = [*common.conv("conv_in", ("conv_in",)),
           *common.linear("time_embedding.linear_1", ("time_embedding", "linear_1")),
           *common.linear("time_embedding.linear_2", ("time_embedding", "linear_2"))]
  chans = cfg.block_out_channels
  n = len(chans)
  lin = cfg.use_linear_projection

  in_ch = chans[0]
  for i in range(n):
    prefix, path = f"down_blocks.{i}", ("down_blocks", i)
    for j in range(cfg.layers_per_block):
      rules += resnet_rules(f"{prefix}.resnets.{j}", (*path, "resnets", j),
                       shortcut=(in_ch if j == 0 else chans[i]) != chans[i])
      if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
        rules += transformer_rules(f"{prefix}.attentions.{j}", (*path, "attentions", j),
                              cfg.transformer_depths[i], lin)
    if i < n - 1:
      rules += common.conv(f"{prefix}.downsamplers.0.conv", (*path, "downsampler", "conv"))
    in_ch = chans[i]

  for j in range(2):
    rules += resnet_rules(f"mid_block.resnets.{j}", ("mid_block", "resnets", j), shortcut=False)
  rules += transformer_rules("mid_block.attentions.0", ("mid_block", "attentions", 0),
                        cfg.transformer_depths[-1], lin)

  depths_rev = cfg.transformer_depths[::-1]
  for i in range(n):
    prefix, path = f"up_blocks.{i}", ("up_blocks", i)
    for j in range(cfg.layers_per_block + 1):
      # Up-path resnets see concatenated skips, so their input width never equals the output.
      rules += resnet_rules(f"{prefix}.resnets.{j}", (*path, "resnets", j), shortcut=True)
      if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
        rules += transformer_rules(f"{prefix}.attentions.{j}", (*path, "attentions", j),
                              depths_rev[i], lin)
    if i < n - 1:
      rules += common.conv(f"{prefix}.upsamplers.0.conv", (*path, "upsampler", "conv"))

  rules += [*common.norm("conv_norm_out", ("conv_norm_out",)),
            *common.conv("conv_out", ("conv_out",))]
  return rules


def _unet_folder(folder: str | os.PathLike) -> Path:
  """A diffusers UNet folder, or the `unet/` subfolder of a pipeline folder."""
  folder = Path(folder)
  if not folder.is_dir():
    raise UserError(f"{folder}: no such folder")
  if (folder / "model_index.json").is_file():
    sub = folder / "unet"
    if not sub.is_dir():
      raise UserError(f"{folder}: a diffusers pipeline folder without a unet/ subfolder")
    return sub
  return folder


def load_unet(folder: str | os.PathLike, dtype: str = "float32",
              remat: str = "none") -> UNet2DCondition:
  """Reads a diffusers UNet folder (config.json + diffusion_pytorch_model*.safetensors).

  `folder` may also be a pipeline folder (with model_index.json): its `unet/` is read. `dtype`
  is the compute dtype; parameters are float32. The module is built abstractly and filled from
  the file, so no random-init copy of the weights is ever allocated.
  """
  folder = _unet_folder(folder)
  cfg = UNetConfig.from_diffusers(common.read_json(folder / "config.json", WHAT),
                                  dtype=dtype, remat=remat)
  files = common.find_weight_file(folder, WEIGHTS_STEM)
  tensors = common.read_safetensors(files)
  unet = abstract_unet(cfg)
  source = str(files[0]) if len(files) == 1 else str(folder)
  common.load_into(unet, unet_rules(cfg), tensors, source=source, what=WHAT)
  return unet


def save_unet(unet: UNet2DCondition, out_folder: str | os.PathLike) -> Path:
  """Writes `unet` as a diffusers UNet folder that `UNet2DConditionModel.from_pretrained` reads.

  The folder is written atomically (an existing one is replaced only on success). Returns it.
  """
  tensors = common.export_from(unet, unet_rules(unet.cfg), what=WHAT)
  out_folder = Path(out_folder)
  with common.AtomicDir(out_folder) as tmp:
    (tmp / "config.json").write_text(json.dumps(unet.cfg.to_diffusers(), indent=2,
                                                sort_keys=True) + "\n")
    common.write_safetensors(tmp / f"{WEIGHTS_STEM}.safetensors", tensors)
  return out_folder
