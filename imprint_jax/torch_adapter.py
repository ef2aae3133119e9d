"""The content adapter in PyTorch: DINOv2 tokens -> UNet cross-attention context.

    from transformers import AutoModel
    from imprint_jax.torch_adapter import ContentAdapterTorch
    dino = AutoModel.from_pretrained("export/image_encoder")       # DINOv2 (+ registers)
    adapter = ContentAdapterTorch.from_pretrained("export/adapter")
    context = adapter(dino(pixel_values=pixels).last_hidden_state)  # (B, L, out_dim)
    uncond = adapter.null(batch, context.shape[1])                  # classifier-free guidance

Same math and parameter names as `imprint_jax.models.adapter.ContentAdapter` (the folder is
what `imprint_jax.convert.save_adapter` writes). A diffusers `ModelMixin`, so a pipeline folder
loads it as a custom component (`model_index.json`: "adapter": ["torch_adapter",
"ContentAdapterTorch"]) with `torch_dtype=` and `variant=`.

This file is shipped verbatim into every export (`adapter/torch_adapter.py`), where only torch
and diffusers exist: it must import neither JAX nor imprint_jax. Bad folders raise ValueError
with one line naming the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors import safe_open
from torch import nn

WEIGHTS_STEM = "diffusion_pytorch_model"
CONFIG_FIELDS = ("in_dim", "width", "depth", "num_heads", "mlp_ratio", "out_dim",
                 "layer_norm_eps")


class _SelfAttention(nn.Module):

  def __init__(self, width: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.q_proj = nn.Linear(width, width)
    self.k_proj = nn.Linear(width, width)
    self.v_proj = nn.Linear(width, width)
    self.out_proj = nn.Linear(width, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, l, d = x.shape
    split = lambda t: t.view(b, l, self.num_heads, d // self.num_heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                       split(self.v_proj(x)))
    return self.out_proj(o.transpose(1, 2).reshape(b, l, d))


class _Mlp(nn.Module):

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as in JAX


class _Block(nn.Module):

  def __init__(self, width: int, num_heads: int, hidden: int, eps: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=eps)
    self.attn = _SelfAttention(width, num_heads)
    self.norm2 = nn.LayerNorm(width, eps=eps)
    self.mlp = _Mlp(width, hidden)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ContentAdapterTorch(ModelMixin, ConfigMixin):
  """DINOv2 tokens (B, L, in_dim) -> UNet cross-attention context (B, L, out_dim)."""

  config_name = "config.json"

  @register_to_config
  def __init__(self, in_dim: int, width: int | None = None, depth: int = 5, num_heads: int = 1,
               mlp_ratio: float = 4.0, out_dim: int = 768, layer_norm_eps: float = 1e-5):
    super().__init__()
    width = in_dim if width is None else width
    self.proj_in = nn.Linear(in_dim, width) if width != in_dim else None
    hidden = int(width * mlp_ratio)
    self.blocks = nn.ModuleList(
        [_Block(width, num_heads, hidden, layer_norm_eps) for _ in range(depth)])
    self.norm_out = nn.LayerNorm(width, eps=layer_norm_eps)
    self.proj_out = nn.Linear(width, out_dim)
    self.null_context = nn.Parameter(torch.zeros(out_dim))

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, in_dim) encoder tokens (all of them: CLS, registers, patches) -> (B, L, out_dim)."""
    x = tokens.to(self.proj_out.weight.dtype)
    if self.proj_in is not None:
      x = self.proj_in(x)
    for block in self.blocks:
      x = block(x)
    return self.proj_out(self.norm_out(x))

  def null(self, batch: int, length: int = 1) -> torch.Tensor:
    """The learned unconditional context, (batch, length, out_dim)."""
    return self.null_context.view(1, 1, -1).expand(batch, length, -1)

  @classmethod
  def from_pretrained(cls, folder: str | os.PathLike, *args: Any,
                      **kwargs: Any) -> ContentAdapterTorch:
    """diffusers' `ModelMixin.from_pretrained` (torch_dtype=, variant=, ...), after checking a
    local folder's config and safetensors keys/shapes so that a bad folder fails with one
    line naming the problem."""
    local = Path(folder) / (kwargs.get("subfolder") or "")
    if local.is_dir():
      _check_folder(cls, local, kwargs.get("variant"))
    return super().from_pretrained(folder, *args, **kwargs)


def _check_folder(cls, folder: Path, variant: str | None) -> None:
  config_path = folder / "config.json"
  name = f"{WEIGHTS_STEM}.{variant}.safetensors" if variant else f"{WEIGHTS_STEM}.safetensors"
  weights_path = folder / name
  if not config_path.is_file():
    raise ValueError(f"{config_path}: missing (a content-adapter folder needs config.json)")
  if not weights_path.is_file():
    raise ValueError(f"{folder}: no weights ({name} not found)")
  try:
    config = json.loads(config_path.read_text())
  except ValueError as e:
    raise ValueError(f"{config_path}: not valid JSON ({e})") from None
  fields = {k: v for k, v in config.items() if not k.startswith("_")}
  unknown = sorted(set(fields) - set(CONFIG_FIELDS))
  if unknown:
    raise ValueError(f"{config_path}: unknown adapter config key {unknown[0]!r}")
  if "in_dim" not in fields:
    raise ValueError(f"{config_path}: missing 'in_dim'; not a content-adapter config")
  with torch.device("meta"):
    want = {k: tuple(v.shape) for k, v in cls(**fields).state_dict().items()}
  with safe_open(str(weights_path), framework="pt") as fh:
    got = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
  for key, shape in want.items():
    if key not in got:
      raise ValueError(f"{weights_path}: missing key {key!r}")
    if got[key] != shape:
      raise ValueError(f"{weights_path}: key {key!r} has shape {got[key]}, expected {shape}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise ValueError(f"{weights_path}: unexpected key {extra[0]!r}")
