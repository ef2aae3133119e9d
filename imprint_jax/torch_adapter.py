"""The content adapter in PyTorch, for running an exported IMPRINT image encoder without JAX.

    from transformers import AutoModel
    from imprint_jax.torch_adapter import ContentAdapterTorch
    dino = AutoModel.from_pretrained("export/image_encoder")       # DINOv2 (+ registers)
    adapter = ContentAdapterTorch.from_pretrained("export/adapter")
    context = adapter(dino(pixel_values=pixels).last_hidden_state)  # (B, L, out_dim)
    uncond = adapter.null(batch, context.shape[1])                  # classifier-free guidance

Same math and parameter names as `imprint_jax.models.adapter.ContentAdapter` (the folder is
what `imprint_jax.convert.save_adapter` writes). This is the only module of the package that
imports torch, and it imports nothing that needs JAX.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imprint_jax.errors import UserError

_FIELDS = ("in_dim", "width", "depth", "num_heads", "mlp_ratio", "out_dim", "layer_norm_eps")


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


class ContentAdapterTorch(nn.Module):
  """DINOv2 tokens (B, L, in_dim) -> UNet cross-attention context (B, L, out_dim)."""

  def __init__(self, in_dim: int, width: int | None = None, depth: int = 5, num_heads: int = 1,
               mlp_ratio: float = 4.0, out_dim: int = 768, layer_norm_eps: float = 1e-5):
    super().__init__()
    width = in_dim if width is None else width
    self.config = {"in_dim": in_dim, "width": width, "depth": depth, "num_heads": num_heads,
                   "mlp_ratio": mlp_ratio, "out_dim": out_dim, "layer_norm_eps": layer_norm_eps}
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
  def from_pretrained(cls, folder: str | os.PathLike, device: Any = None,
                      dtype: torch.dtype | None = None) -> ContentAdapterTorch:
    """Loads a folder written by `imprint_jax.convert.save_adapter` (safetensors only)."""
    from safetensors.torch import load_file
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file():
      raise UserError(f"{config_path}: missing (a content-adapter folder needs config.json)")
    if not weights_path.is_file():
      raise UserError(f"{folder}: no weights (model.safetensors not found)")
    try:
      config = json.loads(config_path.read_text())
    except ValueError as e:
      raise UserError(f"{config_path}: not valid JSON ({e})") from None
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - set(_FIELDS) - {"dtype", "remat"})
    if unknown:
      raise UserError(f"{config_path}: unknown adapter config key {unknown[0]!r}")
    if "in_dim" not in kwargs:
      raise UserError(f"{config_path}: missing 'in_dim'; not a content-adapter config")
    kwargs = {k: v for k, v in kwargs.items() if k in _FIELDS}
    model = cls(**kwargs)
    state = load_file(str(weights_path))
    want = model.state_dict()
    for key in want:
      if key not in state:
        raise UserError(f"{weights_path}: missing key {key!r}")
      if tuple(state[key].shape) != tuple(want[key].shape):
        raise UserError(f"{weights_path}: key {key!r} has shape {tuple(state[key].shape)},"
                        f" expected {tuple(want[key].shape)}")
    extra = sorted(set(state) - set(want))
    if extra:
      raise UserError(f"{weights_path}: unexpected key {extra[0]!r}")
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval()
