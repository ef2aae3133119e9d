"""diffusers `UNet2DConditionModel` folders <-> `models.unet.UNet2DCondition`, both ways.

The config.json translation (`config_from_diffusers`, `config_to_diffusers`) refuses, naming
the key, anything the model does not reproduce exactly. One name table (`unet_rules`) built
from the config serves import and export. Besides the renames in `models/unet.py`'s
docstring, 1x1 convolutions (resnet shortcuts; the transformers' `proj_in`/`proj_out` unless
`use_linear_projection`) become dense kernels: kind 'conv1x1_linear'.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from imprint_jax.convert import common
from imprint_jax.convert.common import DIFFUSERS_VERSION, Rule, join
from imprint_jax.errors import UserError
from imprint_jax.models.unet import UNet2DCondition, UNetConfig, abstract_unet

WHAT = "UNet2DConditionModel"
WEIGHTS_STEM = "diffusion_pytorch_model"


def config_from_diffusers(config: dict[str, Any], *, dtype: str = "float32",
                          remat: str = "none") -> UNetConfig:
  """The UNetConfig of a diffusers `UNet2DConditionModel` config.json dict; `dtype` (compute)
  and `remat` are our runtime choices.

  Raises UserError naming the key for anything this implementation does not reproduce
  exactly (other block types, class/addition embeddings, scale-shift resnets, ...).
  """
  if not isinstance(config, dict):
    raise UserError(f"UNet config: expected a JSON object, got {type(config).__name__}")
  name = config.get("_class_name", "UNet2DConditionModel")
  if name != "UNet2DConditionModel":
    raise UserError(f"UNet config: _class_name={name!r}; expected 'UNet2DConditionModel'")

  def bad(key: str, hint: str = "") -> UserError:
    return UserError(f"UNet config: {key}={config[key]!r} is not supported{hint}")

  # key -> the only value we support (diffusers' default); anything else changes the network.
  must_equal = {
      "class_embed_type": None, "addition_embed_type": None, "time_cond_proj_dim": None,
      "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
      "resnet_time_scale_shift": "default", "conv_in_kernel": 3, "conv_out_kernel": 3,
      "num_class_embeds": None, "time_embedding_type": "positional",
      "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
      "attention_type": "default", "mid_block_scale_factor": 1,
      "reverse_transformer_layers_per_block": None, "dropout": 0.0,
  }
  for key, want in must_equal.items():
    if key in config and config[key] != want:
      raise bad(key, f" (only {want!r})")
  if config.get("num_attention_heads") is not None:
    # diffusers' UNet2DConditionModel itself refuses this key (see its __init__).
    raise bad("num_attention_heads", "; diffusers' UNet2DConditionModel sets heads via"
              " attention_head_dim")
  if config.get("norm_num_groups", 32) is None:
    raise bad("norm_num_groups", " (a UNet without output GroupNorm)")
  oca = config.get("only_cross_attention", False)
  if any(oca) if isinstance(oca, (list, tuple)) else oca:
    raise bad("only_cross_attention")

  def uniform(key: str, default: Any) -> Any:
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        raise bad(key, " (per-block values differ)")
      value = value[0]
    return value

  def as_tuple(key: str, default: Any) -> Any:
    value = config.get(key, default)
    if isinstance(value, (list, tuple)):
      if any(isinstance(v, (list, tuple)) for v in value):
        raise bad(key, " (nested per-layer lists)")
      return tuple(value)
    return value

  d = UNetConfig()
  sample_size = config.get("sample_size", d.sample_size)
  if isinstance(sample_size, (list, tuple)):
    sample_size = tuple(sample_size)
  try:
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        sample_size=sample_size,
        block_out_channels=tuple(config.get("block_out_channels", d.block_out_channels)),
        down_block_types=tuple(config.get("down_block_types", d.down_block_types)),
        up_block_types=tuple(config.get("up_block_types", d.up_block_types)),
        mid_block_type=config.get("mid_block_type", d.mid_block_type),
        layers_per_block=uniform("layers_per_block", 2),
        attention_head_dim=as_tuple("attention_head_dim", 8),
        num_attention_heads=None,
        cross_attention_dim=uniform("cross_attention_dim", 1280),
        use_linear_projection=config.get("use_linear_projection", False),
        upcast_attention=config.get("upcast_attention", False),
        only_cross_attention=False,
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        act_fn=config.get("act_fn", "silu"),
        transformer_layers_per_block=as_tuple("transformer_layers_per_block", 1),
        downsample_padding=config.get("downsample_padding", 1),
        center_input_sample=config.get("center_input_sample", False),
        dtype=dtype, remat=remat)
  except TypeError as e:  # e.g. a string where a number belongs
    raise UserError(f"UNet config: malformed value ({e})") from None

def config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
  """A complete diffusers config.json dict for `UNet2DConditionModel` (every init argument)."""
  try:
    diffusers_version = metadata.version("diffusers")
  except Exception:  # noqa: BLE001 - the version string is informative only
    diffusers_version = DIFFUSERS_VERSION

  def jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v

  # The head counts go under the legacy key, as in every diffusers SD checkpoint.
  head_key = jsonable(cfg.num_attention_heads or cfg.attention_head_dim)
  return {
      "_class_name": "UNet2DConditionModel",
      "_diffusers_version": diffusers_version,
      "act_fn": cfg.act_fn,
      "addition_embed_type": None,
      "addition_embed_type_num_heads": 64,
      "addition_time_embed_dim": None,
      "attention_head_dim": head_key,
      "attention_type": "default",
      "block_out_channels": list(cfg.block_out_channels),
      "center_input_sample": cfg.center_input_sample,
      "class_embed_type": None,
      "class_embeddings_concat": False,
      "conv_in_kernel": 3,
      "conv_out_kernel": 3,
      "cross_attention_dim": cfg.cross_attention_dim,
      "cross_attention_norm": None,
      "down_block_types": list(cfg.down_block_types),
      "downsample_padding": cfg.downsample_padding,
      "dropout": 0.0,
      "dual_cross_attention": False,
      "encoder_hid_dim": None,
      "encoder_hid_dim_type": None,
      "flip_sin_to_cos": cfg.flip_sin_to_cos,
      "freq_shift": cfg.freq_shift,
      "in_channels": cfg.in_channels,
      "layers_per_block": cfg.layers_per_block,
      "mid_block_only_cross_attention": None,
      "mid_block_scale_factor": 1,
      "mid_block_type": cfg.mid_block_type,
      "norm_eps": cfg.norm_eps,
      "norm_num_groups": cfg.norm_num_groups,
      "num_attention_heads": None,
      "num_class_embeds": None,
      "only_cross_attention": False,
      "out_channels": cfg.out_channels,
      "projection_class_embeddings_input_dim": None,
      "resnet_out_scale_factor": 1.0,
      "resnet_skip_time_act": False,
      "resnet_time_scale_shift": "default",
      "reverse_transformer_layers_per_block": None,
      "sample_size": jsonable(cfg.sample_size),
      "time_cond_proj_dim": None,
      "time_embedding_act_fn": None,
      "time_embedding_dim": None,
      "time_embedding_type": "positional",
      "timestep_post_act": None,
      "transformer_layers_per_block": jsonable(cfg.transformer_layers_per_block),
      "up_block_types": list(cfg.up_block_types),
      "upcast_attention": cfg.upcast_attention,
      "use_linear_projection": cfg.use_linear_projection,
  }



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
  cfg = config_from_diffusers(common.read_json(folder / "config.json", WHAT), dtype=dtype,
                              remat=remat)
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
    (tmp / "config.json").write_text(json.dumps(config_to_diffusers(unet.cfg), indent=2,
                                                sort_keys=True) + "\n")
    common.write_safetensors(tmp / f"{WEIGHTS_STEM}.safetensors", tensors)
  return out_folder
