"""DINOv2 ViT image encoder (with or without registers), matching transformers' `Dinov2Model`.

The module returns every token after the final LayerNorm: CLS, then the register tokens (if
any), then the patch tokens in row-major order. Pixels come in NHWC, already normalised with
the ImageNet mean/std. Inputs whose side is not a multiple of the patch size lose the
remainder, as with PyTorch's strided convolution.

Position embeddings are stored on the native grid (`image_size // patch_size` per side) and
resampled to other grids exactly the way transformers does it, so that outputs agree at any
resolution:
  * `dinov2` (no registers): PyTorch bicubic, a = -0.75, align_corners=False, no antialias,
    border-replicated taps;
  * `dinov2_with_registers`: PyTorch's antialiased bicubic (PIL's kernel, a = -0.5, support
    widened by the scale when shrinking, taps outside the grid dropped and weights
    renormalised).
`jax.image.resize` implements neither, so the resampling is two small matrices built in numpy
at trace time (the grid sizes are static) and applied with a float32 einsum.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imprint_jax.errors import UserError
from imprint_jax.models import attention, layers

_PRESETS = {  # name -> (hidden_size, num_layers, num_heads, use_swiglu_ffn)
    "s": (384, 12, 6, False),
    "b": (768, 12, 12, False),
    "l": (1024, 24, 16, False),
    "g": (1536, 40, 24, True),
}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """Architecture of a DINOv2 ViT; field meanings follow transformers' `Dinov2Config`.

  `image_size` is the side of the native position-embedding grid in pixels (518 for the
  released checkpoints: 37 x 37 patches); other input sizes are handled by interpolation.
  `use_mask_token` only says whether the (inference-unused) mask token exists in the file.
  """
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_ratio: float = 4.0
  patch_size: int = 14
  image_size: int = 518
  num_channels: int = 3
  num_register_tokens: int = 0
  use_swiglu_ffn: bool = False
  layerscale_value: float = 1.0
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  use_mask_token: bool = True
  dtype: str = "float32"
  remat: str = "none"

  def __post_init__(self):
    layers.compute_dtype(self.dtype)
    layers.remat_policy_check(self.remat)
    if self.hidden_size % self.num_heads:
      raise UserError(f"DINOv2 hidden_size {self.hidden_size} is not divisible by num_heads"
                      f" {self.num_heads}")
    if self.image_size < self.patch_size:
      raise UserError(f"DINOv2 image_size {self.image_size} is smaller than patch_size"
                      f" {self.patch_size}")
    if self.num_register_tokens < 0:
      raise UserError(f"DINOv2 num_register_tokens must be >= 0, got {self.num_register_tokens}")
    if self.num_register_tokens and not self.use_mask_token:
      raise UserError("DINOv2 with registers always has a mask token: use_mask_token must be"
                      " true")

  @property
  def grid_size(self) -> int:
    """Patches per side of the native position-embedding grid."""
    return self.image_size // self.patch_size

  @property
  def mlp_hidden(self) -> int:
    """Hidden width of the feed-forward block (of each SwiGLU half when SwiGLU is on)."""
    hidden = int(self.hidden_size * self.mlp_ratio)
    if self.use_swiglu_ffn:
      # transformers (and the DINOv2 release): two thirds, rounded up to a multiple of 8.
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden

  @classmethod
  def preset(cls, name: str, registers: int = 0, **overrides: Any) -> Dinov2Config:
    """The released sizes: 's' (ViT-S/14), 'b', 'l', 'g' (ViT-g/14, SwiGLU); 0 or 4 registers.

    `overrides` replaces any field (dtype, remat, or e.g. num_layers for a cut-down test).
    """
    key = name.lower().removeprefix("vit-").removesuffix("/14")
    if key not in _PRESETS:
      raise UserError(f"unknown DINOv2 preset {name!r}: expected one of {sorted(_PRESETS)}")
    hidden, depth, heads, swiglu = _PRESETS[key]
    fields = dict(hidden_size=hidden, num_layers=depth, num_heads=heads,
                  use_swiglu_ffn=swiglu, num_register_tokens=registers)
    return cls(**{**fields, **overrides})


# ----------------------------------------------------------------- position-embedding resampling

def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a`, evaluated at distances `x`."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """(n_out, n_in) float64 matrix doing PyTorch's 1-D bicubic resize (align_corners=False).

  Without antialias: torch's `upsample_bicubic2d` (a = -0.75, source index scale*(i+0.5)-0.5,
  taps clamped to the border). With antialias: torch's `_upsample_bicubic2d_aa` (a = -0.5,
  kernel stretched by the scale when shrinking, out-of-range taps dropped, rows normalised).
  """
  scale = n_in / n_out
  m = np.zeros((n_out, n_in))
  rows = np.arange(n_out)
  if not antialias:
    src = scale * (rows + 0.5) - 0.5
    base = np.floor(src).astype(np.int64)
    t = src - base
    for k in range(4):  # taps at base-1 .. base+2, distances t+1, t, 1-t, 2-t
      w = _cubic(t + 1 - k, -0.75)
      np.add.at(m, (rows, np.clip(base - 1 + k, 0, n_in - 1)), w)
    m.setflags(write=False)  # cached: shared between callers
    return m
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  for i in rows:
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), n_in)
    w = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
    m[i, lo:hi] = w / w.sum()
  m.setflags(write=False)
  return m


def resize_pos_embed(grid_NND: jax.Array, height: int, width: int, *,
                     antialias: bool) -> jax.Array:
  """Resamples a square (n, n, D) position grid to (height, width, D), in float32."""
  n = grid_NND.shape[0]
  mh = jnp.asarray(bicubic_matrix(n, height, antialias), jnp.float32)
  mw = jnp.asarray(bicubic_matrix(n, width, antialias), jnp.float32)
  grid = grid_NND.astype(jnp.float32)
  return jnp.einsum("ih,jw,hwd->ijd", mh, mw, grid, precision=jax.lax.Precision.HIGHEST)


# --------------------------------------------------------------------------------- modules

def _trunc_normal(std: float = 0.02):
  return layers.truncated_normal(std)


class Attention(nnx.Module):
  """Multi-head self-attention with separate query/key/value projections (as in the file)."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    dt = layers.compute_dtype(cfg.dtype)
    d = cfg.hidden_size
    self.num_heads = cfg.num_heads
    init = _trunc_normal()
    self.query = layers.dense(d, d, ("embed", "heads"), dtype=dt, rngs=rngs,
                              use_bias=cfg.qkv_bias, kernel_init=init)
    self.key = layers.dense(d, d, ("embed", "heads"), dtype=dt, rngs=rngs,
                            use_bias=cfg.qkv_bias, kernel_init=init)
    self.value = layers.dense(d, d, ("embed", "heads"), dtype=dt, rngs=rngs,
                              use_bias=cfg.qkv_bias, kernel_init=init)
    self.out = layers.dense(d, d, ("heads", "embed"), dtype=dt, rngs=rngs, kernel_init=init)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    b, l, d = x_BLD.shape
    split = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)
    o_BLHK = attention.attention(split(self.query(x_BLD)), split(self.key(x_BLD)),
                              split(self.value(x_BLD)))
    return self.out(o_BLHK.reshape(b, l, d))


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> fc2."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    dt = layers.compute_dtype(cfg.dtype)
    init = _trunc_normal()
    self.fc1 = layers.dense(cfg.hidden_size, cfg.mlp_hidden, ("embed", "mlp"), dtype=dt,
                            rngs=rngs, kernel_init=init)
    self.fc2 = layers.dense(cfg.mlp_hidden, cfg.hidden_size, ("mlp", "embed"), dtype=dt,
                            rngs=rngs, kernel_init=init)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    return self.fc2(layers.gelu(self.fc1(x_BLD)))


class SwiGLU(nnx.Module):
  """silu(x W_gate) * (x W_up) -> W_out; gate and up are one fused matrix, as in the file."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    dt = layers.compute_dtype(cfg.dtype)
    init = _trunc_normal()
    self.weights_in = layers.dense(cfg.hidden_size, 2 * cfg.mlp_hidden, ("embed", "mlp"),
                                   dtype=dt, rngs=rngs, kernel_init=init)
    self.weights_out = layers.dense(cfg.mlp_hidden, cfg.hidden_size, ("mlp", "embed"),
                                    dtype=dt, rngs=rngs, kernel_init=init)

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    gate, up = jnp.split(self.weights_in(x_BLD), 2, axis=-1)
    return self.weights_out(jax.nn.silu(gate) * up)


class Block(nnx.Module):
  """Pre-LN transformer layer with LayerScale on both residual branches."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    dt = layers.compute_dtype(cfg.dtype)
    d = cfg.hidden_size
    self.norm1 = layers.layer_norm(d, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
    self.attention = Attention(cfg, rngs=rngs)
    self.layer_scale1 = nnx.Param(jnp.full((d,), cfg.layerscale_value, jnp.float32),
                                  **layers.axes("norm"))
    self.norm2 = layers.layer_norm(d, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)
    self.mlp = SwiGLU(cfg, rngs=rngs) if cfg.use_swiglu_ffn else Mlp(cfg, rngs=rngs)
    self.layer_scale2 = nnx.Param(jnp.full((d,), cfg.layerscale_value, jnp.float32),
                                  **layers.axes("norm"))
    self.dtype = dt

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x_BLD = x_BLD + self.attention(self.norm1(x_BLD)) * self.layer_scale1[...].astype(self.dtype)
    return x_BLD + self.mlp(self.norm2(x_BLD)) * self.layer_scale2[...].astype(self.dtype)


class Dinov2(nnx.Module):
  """DINOv2 ViT: `(B, H, W, C)` normalised pixels -> `(B, 1 + R + (H//p)*(W//p), D)` tokens."""

  def __init__(self, cfg: Dinov2Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = layers.compute_dtype(cfg.dtype)
    d, n = cfg.hidden_size, cfg.grid_size
    self.patch_embed = layers.conv(cfg.num_channels, d, cfg.patch_size, dtype=dt, rngs=rngs,
                                   stride=cfg.patch_size, padding="VALID",
                                   kernel_init=_trunc_normal())
    # Shapes follow the file ((1, 1, D) etc.) so the converter copies them unchanged.
    self.cls_token = nnx.Param(_trunc_normal()(rngs.params(), (1, 1, d), jnp.float32),
                               **layers.axes(None, None, "embed"))
    if cfg.use_mask_token:
      self.mask_token = nnx.Param(jnp.zeros((1, d), jnp.float32), **layers.axes(None, "embed"))
    self.position_embeddings = nnx.Param(
        _trunc_normal()(rngs.params(), (1, n * n + 1, d), jnp.float32),
        **layers.axes(None, None, "embed"))
    if cfg.num_register_tokens:
      self.register_tokens = nnx.Param(
          jnp.zeros((1, cfg.num_register_tokens, d), jnp.float32),
          **layers.axes(None, None, "embed"))
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.layernorm = layers.layer_norm(d, eps=cfg.layer_norm_eps, dtype=dt, rngs=rngs)

  def pos_embed(self, grid_h: int, grid_w: int) -> jax.Array:
    """(1, 1 + grid_h * grid_w, D) float32 position embeddings for a grid_h x grid_w grid."""
    pos = self.position_embeddings[...]
    n = self.cfg.grid_size
    if (grid_h, grid_w) == (n, n):
      return pos
    d = pos.shape[-1]
    grid = resize_pos_embed(pos[0, 1:].reshape(n, n, d), grid_h, grid_w,
                            antialias=self.cfg.num_register_tokens > 0)
    return jnp.concatenate([pos[:, :1], grid.reshape(1, grid_h * grid_w, d)], axis=1)

  def __call__(self, pixels_BHWC: jax.Array) -> jax.Array:
    """All output tokens (CLS, registers, patches row-major) after the final LayerNorm.

    Args:
      pixels_BHWC: (B, H, W, num_channels) images normalised with the ImageNet mean/std;
        H and W at least `patch_size` (remainders of H/W modulo the patch size are dropped).

    Returns:
      (B, 1 + num_register_tokens + (H // p) * (W // p), hidden_size), compute dtype.
    """
    cfg = self.cfg
    dt = layers.compute_dtype(cfg.dtype)
    b, h, w, c = pixels_BHWC.shape
    if c != cfg.num_channels or h < cfg.patch_size or w < cfg.patch_size:
      raise UserError(f"DINOv2 input has shape {pixels_BHWC.shape}; expected (B, H, W,"
                      f" {cfg.num_channels}) with H, W >= {cfg.patch_size}")
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    patches = self.patch_embed(pixels_BHWC.astype(dt)).reshape(b, gh * gw, cfg.hidden_size)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1) + self.pos_embed(gh, gw).astype(dt)
    if cfg.num_register_tokens:
      reg = jnp.broadcast_to(self.register_tokens[...].astype(dt),
                             (b, cfg.num_register_tokens, cfg.hidden_size))
      x = jnp.concatenate([x[:, :1], reg, x[:, 1:]], axis=1)
    for block in self.layers:
      x = layers.call_block(block, x, remat=cfg.remat)
    return self.layernorm(x)


def abstract_dinov2(cfg: Dinov2Config) -> Dinov2:
  """A Dinov2 whose parameters are shape/dtype placeholders (no memory): fill with load_into."""
  return nnx.eval_shape(lambda: Dinov2(cfg, rngs=layers.init_rngs(0)))


def num_tokens(cfg: Dinov2Config, height: int, width: int) -> int:
  """Tokens the encoder returns for an (height, width) image."""
  return 1 + cfg.num_register_tokens + (height // cfg.patch_size) * (width // cfg.patch_size)
