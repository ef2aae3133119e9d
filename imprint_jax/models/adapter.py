"""The content adapter: DINOv2 tokens -> the UNet's cross-attention context.

As in ObjectStitch (and IMPRINT's image encoder), a few pre-LN transformer blocks run over all
encoder tokens (CLS, registers and patches), then a LayerNorm and a linear projection to the
UNet's cross-attention width. The adapter also owns the learned null context used for
classifier-free guidance and embedding dropout: one vector, broadcast to any length, because
attention over L identical keys/values equals attention over one of them.

`imprint_jax/torch_adapter.py` is the same math in PyTorch with the same parameter names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.models import attention, layers


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Architecture of the content adapter.

  `in_dim` is the encoder width (DINOv2 hidden size); `width` the adapter's own width (None:
  same as `in_dim`; an input projection exists only when they differ); `out_dim` the UNet's
  cross-attention width (768 for SD 1.x, 1024 for SD 2.x).
  """
  in_dim: int
  width: int | None = None
  depth: int = 5
  num_heads: int = 1
  mlp_ratio: float = 4.0
  out_dim: int = 768
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    if self.width is None:
      object.__setattr__(self, "width", self.in_dim)
    layers.compute_dtype(self.dtype)
    layers.remat_policy_check(self.remat)
    for name in ("in_dim", "width", "num_heads", "out_dim"):
      if int(getattr(self, name)) < 1:
        raise UserError(f"adapter {name} must be >= 1, got {getattr(self, name)}")
    if self.depth < 0:
      raise UserError(f"adapter depth must be >= 0, got {self.depth}")
    if self.width % self.num_heads:
      raise UserError(f"adapter width {self.width} is not divisible by num_heads"
                      f" {self.num_heads}")
    if self.mlp_hidden < 1:
      raise UserError(f"adapter mlp_ratio {self.mlp_ratio} leaves no MLP width")

  @property
  def mlp_hidden(self) -> int:
    return int(self.width * self.mlp_ratio)

  @property
  def has_proj_in(self) -> bool:
    return self.width != self.in_dim


class SelfAttention(nnx.Module):
  """Multi-head self-attention with biased q/k/v/out projections."""

  def __init__(self, width: int, num_heads: int, *, dtype: Any, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.q_proj = layers.dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.k_proj = layers.dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.v_proj = layers.dense(width, width, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.out_proj = layers.dense(width, width, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    b, l, d = x_BLD.shape
    split = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)
    o = attention.attention(split(self.q_proj(x_BLD)), split(self.k_proj(x_BLD)),
                         split(self.v_proj(x_BLD)))
    return self.out_proj(o.reshape(b, l, d))


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, *, dtype: Any, rngs: nnx.Rngs):
    self.fc1 = layers.dense(width, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = layers.dense(hidden, width, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    return self.fc2(layers.gelu(self.fc1(x_BLD)))


class AdapterBlock(nnx.Module):
  """x + attn(LN(x)), then x + mlp(LN(x))."""

  def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
    dt = layers.compute_dtype(cfg.dtype)
    self.norm1 = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
    self.attn = SelfAttention(cfg.width, cfg.num_heads, dtype=dt, rngs=rngs)
    self.norm2 = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
    self.mlp = Mlp(cfg.width, cfg.mlp_hidden, dtype=dt, rngs=rngs)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x_BLD = x_BLD + self.attn(self.norm1(x_BLD))
    return x_BLD + self.mlp(self.norm2(x_BLD))


class ContentAdapter(nnx.Module):
  """Encoder tokens `(B, L, in_dim)` -> cross-attention context `(B, L, out_dim)`."""

  def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = layers.compute_dtype(cfg.dtype)
    if cfg.has_proj_in:
      self.proj_in = layers.dense(cfg.in_dim, cfg.width, (None, "embed"), dtype=dt, rngs=rngs)
    self.blocks = nnx.List([AdapterBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm_out = layers.layer_norm(cfg.width, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
    self.proj_out = layers.dense(cfg.width, cfg.out_dim, ("embed", "cross"), dtype=dt,
                                 rngs=rngs)
    # Zeros: a neutral start for the unconditional context; it is trained like any weight.
    self.null_context = nnx.Param(jnp.zeros((cfg.out_dim,), jnp.float32),
                                  **layers.axes("cross"))

  def __call__(self, tokens_BLD: jax.Array) -> jax.Array:
    """Maps encoder tokens (B, L, in_dim) to context (B, L, out_dim) in the compute dtype."""
    cfg = self.cfg
    if tokens_BLD.ndim != 3 or tokens_BLD.shape[-1] != cfg.in_dim:
      raise UserError(f"adapter input has shape {tokens_BLD.shape}; expected (B, L,"
                      f" {cfg.in_dim})")
    x = tokens_BLD.astype(layers.compute_dtype(cfg.dtype))
    if cfg.has_proj_in:
      x = self.proj_in(x)
    for block in self.blocks:
      x = layers.call_block(block, x, remat=cfg.remat)
    return self.proj_out(self.norm_out(x))

  def null(self, batch: int, length: int = 1) -> jax.Array:
    """The unconditional context, (batch, length, out_dim), in the compute dtype."""
    dt = layers.compute_dtype(self.cfg.dtype)
    return jnp.broadcast_to(self.null_context[...].astype(dt),
                            (batch, length, self.cfg.out_dim))


def abstract_adapter(cfg: AdapterConfig) -> ContentAdapter:
  """A ContentAdapter with placeholder parameters (no memory): fill with load_into."""
  return nnx.eval_shape(lambda: ContentAdapter(cfg, rngs=layers.init_rngs(0)))
